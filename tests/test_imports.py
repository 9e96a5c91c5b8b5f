"""The package's modules import each other without a cycle: the dispatch finds the backends by module name
(imported on first use) and registers nothing at import. Every ``import`` statement counts,
module-level or inside a function."""

import ast
import pathlib

import vera_kernels

PACKAGE = pathlib.Path(vera_kernels.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str, modules) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            for alias in node.names:
                # "from . import ops" imports the submodule ops; "from .layer import X" the module layer.
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in modules else module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path, name, modules) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycle():
    edges = graph()
    assert "vera_kernels.dispatch" in edges and "vera_kernels.triton.function" in edges
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_dispatch_imports_no_backend():
    # It names them (module:attribute strings) and imports them on first use.
    edges = graph()
    backends = {"vera_kernels._extension", "vera_kernels.reference", "vera_kernels.projections", "vera_kernels.triton",
                "vera_kernels.triton.function", "vera_kernels.triton.linear", "vera_kernels.triton.projection"}
    assert not edges["vera_kernels.dispatch"] & backends
    for backend in ("vera_kernels._extension", "vera_kernels.reference", "vera_kernels.triton",
                    "vera_kernels.triton.projection", "vera_kernels.buffers"):
        assert "vera_kernels.dispatch" not in edges[backend], backend
