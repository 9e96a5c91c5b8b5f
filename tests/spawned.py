"""Worker processes for the distributed tests (gloo over 127.0.0.1 on this machine): a free port, and the
spawn that fails the test instead of hanging it when the workers do not finish."""

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(worker, args: tuple, nprocs: int, timeout_s: float) -> None:
    """worker(rank, *args) in ``nprocs`` spawned processes; the test fails (the workers killed) past timeout_s.
    The workers leave their results on disk (gloo may abort at interpreter exit, see test_distributed.py)."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} workers did not finish in {timeout_s} s")
