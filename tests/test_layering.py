"""The package's floors stay floors: no import cycle among isdpo modules (function-local imports
counted), no isdpo import hidden in a function, no private name imported from another module, and
function-local imports only for optional heavy dependencies."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "isdpo"
# optional heavy dependencies, imported only where the feature that needs them runs
LAZY_OK = {"wandb", "pyarrow", "pyarrow.parquet", "datasets", "openai", "peft"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(path: Path):
    """(target module, imported names, function-local?) of every import in ``path``."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], id(node) in local
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], id(node) in local


def edges(name: str, path: Path) -> set[str]:
    out = set()
    for target, names, _ in imports(path):
        if not target.startswith("isdpo"):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        out.update(subs or [target])
    out.discard(name)
    return out


def test_no_import_cycle():
    graph = {name: edges(name, path) for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert len(graph) > 20  # the walk saw the package


def test_function_local_imports_are_only_for_optional_heavy_dependencies():
    found = [(module_name(p), t) for p in MODULES.values() for t, _, is_local in imports(p) if is_local]
    assert found, "the scan found no function-local import at all: check it still parses the package"
    assert [f for f in found if f[1].startswith("isdpo")] == []
    assert [f for f in found if f[1] not in LAZY_OK] == []
    assert len(found) <= 8, found


def test_no_private_name_is_imported_from_another_module():
    bad = [(module_name(p), t, n) for p in MODULES.values() for t, names, _ in imports(p)
           if t.startswith("isdpo") for n in names if n.startswith("_")]
    assert bad == []
