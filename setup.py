"""Build of vera_kernels: the Python package and its optional C++/CUDA extension vera_kernels._C.

Environment switches, read at build time only:
  VERA_KERNELS_BUILD_EXT=0         pure-Python install, no extension (torch need not be importable)
  VERA_KERNELS_CUDA=auto|1|0       CUDA kernels when torch has CUDA and nvcc is found (auto, default),
                                   always (1: fails if impossible) or never (0)
  TORCH_CUDA_ARCH_LIST             GPU targets; default sm_80 and sm_90a code plus compute_90 PTX
  MAX_JOBS                         parallel compile jobs; default from cores and free memory
"""

import os
import sys
import sysconfig
from pathlib import Path

import setuptools
from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()

# Without TORCH_CUDA_ARCH_LIST: Ampere and Hopper (with its wgmma/setmaxnreg features) as code, and
# compute_90 PTX so that newer GPUs can JIT-compile it. sm_90a code alone would not run on them.
DEFAULT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]

# One compile job per this much available memory: nvcc and torch-header compiles take 1-3 GB each.
BYTES_PER_JOB = 3 * 1024**3


def _env_flag(name, allowed, default):
    value = os.environ.get(name, default).strip().lower()
    if value not in allowed:
        sys.exit(f"setup.py: {name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _available_memory():
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _default_max_jobs():
    cores = os.cpu_count() or 1
    memory = _available_memory()
    if memory is None:
        return cores
    return max(1, min(cores, memory // BYTES_PER_JOB))


def _want_cuda(torch, cuda_home):
    mode = _env_flag("VERA_KERNELS_CUDA", ("auto", "0", "1"), "auto")
    if mode == "0":
        return False
    # torch leaves CUDA_HOME unset in its CPU builds, so nvcc is only worth looking for in CUDA builds.
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        reason = "nvcc was not found (set CUDA_HOME)"
    else:
        return True
    if mode == "1":
        sys.exit(f"setup.py: VERA_KERNELS_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False


def _ninja_on_path():
    """Put this Python's scripts directory first on PATH: a virtual environment's ``ninja`` (from
    requirements.txt) is there, and torch looks for ninja on PATH. Without ninja torch compiles every source
    again on every build."""
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def _persistent_build_ext(build_extension):
    """torch's BuildExtension compiling into build/temp.<platform>-<python>/ in the repository.

    ``pip install -e .`` (PEP 660) hands build_ext a fresh temporary directory every time, so every
    source would be compiled again. Here the objects and ninja's build file and log survive between
    builds, and ninja recompiles only a source that is newer than its object, or one of whose headers is
    (it reads the compiler's dependency files), or whose command line changed: a second install with
    nothing changed compiles nothing and only links."""

    class PersistentBuildExtension(build_extension):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

    return PersistentBuildExtension


def _extensions():
    """The extension list and the build_ext command class, or nothing for a pure-Python install."""
    if _env_flag("VERA_KERNELS_BUILD_EXT", ("0", "1"), "1") == "0":
        return [], {}

    try:
        import torch
    except ImportError:
        sys.exit(
            "setup.py: the extension is built against the installed torch, which this Python cannot import. "
            "Install torch first and build with `pip install --no-build-isolation .` (an isolated build "
            "has no torch), or set VERA_KERNELS_BUILD_EXT=0 for a pure-Python install."
        )
    _ninja_on_path()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))

    sources = ["csrc/projection_cpu.cpp", "csrc/vera_cpu.cpp", "csrc/vera_ops.cpp", "python_bindings/bindings.cpp"]
    # No -std flag: torch adds the standard its headers need (C++17 or C++20 by version). -g0 overrides
    # the -g some Pythons put in their CFLAGS: debug info for the torch headers makes the module ~40x
    # larger and its heaviest compile ~1.5x slower.
    cxx_flags = ["-O3", "-g0"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs serially unless compiled with OpenMP; the libgomp it links is the one
        # torch has already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    common = dict(
        name="vera_kernels._C",
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=link_flags,
    )
    if _want_cuda(torch, CUDA_HOME):
        nvcc_flags = ["-O3"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Any flag naming an arch makes torch skip its own arch selection.
            nvcc_flags += DEFAULT_GENCODE
        ext = CUDAExtension(
            sources=sources + ["csrc/projection_cuda.cu", "csrc/vera_cuda.cu"],
            define_macros=[("VERA_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **common,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": _persistent_build_ext(BuildExtension)}


ext_modules, cmdclass = _extensions()

# What each feature imports beyond torch. The core (the ops, the layer, apply_vera, adapter files) needs
# torch and safetensors; the rest is optional and imported only where used.
EXTRAS = {
    "triton": ["triton"],                              # the triton backend (GPU, or CPU under its interpreter)
    "peft": ["peft", "transformers"],                  # from_peft / to_peft / to_lora, GPT-2 Conv1D, the demo
    "bench": ["pytest", "pytest-benchmark", "peft", "transformers", "matplotlib"],  # bench/, its plot
    "test": ["pytest", "pytest-benchmark", "peft", "transformers", "accelerate"],   # tests/
    # quantized bases (tests/test_quantized.py, demo --base nf4); torchao must match torch's release
    "quantized": ["bitsandbytes>=0.50.2", "torchao", "hqq>=0.2.8", "optimum-quanto>=0.2.7"],
}
EXTRAS["all"] = sorted({name for names in EXTRAS.values() for name in names})

setup(
    name="vera_kernels",
    version="0.1.0",
    description="Fused VeRA (vector-based random matrix adaptation) kernels for PyTorch",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # PEP 639's license_expression from setuptools 77 on; the older field before (requirements.txt: >= 64).
    **({"license_expression": "Apache-2.0"} if int(setuptools.__version__.split(".")[0]) >= 77 else {"license": "Apache-2.0"}),
    license_files=["LICENSE"],
    packages=find_packages(include=["vera_kernels", "vera_kernels.*"]),
    package_data={"vera_kernels": ["data/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors"],
    extras_require=EXTRAS,
    # vLLM loads this group in each of its processes; the resolver registers only where
    # VERA_KERNELS_VLLM_ADAPTERS is set (vera_kernels/vllm_resolver.py).
    entry_points={"vllm.general_plugins": ["vera_kernels_resolver = vera_kernels.vllm_resolver:register"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
