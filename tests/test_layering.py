"""The package's floors stay floors: every module sits on a floor of docs/architecture.md's drawing and imports
only from its own floor or the floors below; no import cycle among isdpo modules (function-local imports counted),
no isdpo import hidden in a function, no private name imported from another module, and function-local imports
only for optional heavy dependencies."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "isdpo"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# optional heavy dependencies, imported only where the feature that needs them runs
LAZY_OK = {"wandb", "pyarrow", "pyarrow.parquet", "datasets", "openai", "peft"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}
ENTRY = {"launch": ROOT / "launch.py"}  # the entry point beside the package, drawn on the top floor


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


def drawn_floors() -> tuple[dict[str, int], list[str]]:
    """docs/architecture.md's drawing as {module or package: floor}, 0 = the top floor, and the files it names that
    do not exist. Floors are separated by lines of box-drawing rules; a floor holds the ``name.py`` files
    (``launch.py`` beside the package, the rest in ``isdpo/``) and the ``name/`` packages written on its lines."""
    drawing = ARCHITECTURE.read_text().split("```")[1]
    floors: dict[str, int] = {}
    missing: list[str] = []
    floor = 0
    for line in drawing.splitlines():
        if "─" in line:
            floor += 1
            continue
        for stem, kind in re.findall(r"(?<![\w/.])([a-z_]+)(\.py|/)(?![\w])", line):
            name = stem if stem in ENTRY else f"isdpo.{stem}"
            if kind == ".py" and not (name in ENTRY or (PKG / f"{stem}.py").exists()):
                missing.append(f"{stem}.py")
            elif kind == "/" and not (PKG / stem / "__init__.py").exists():
                continue  # a folder outside the package (conf/)
            floors[name] = floor
    return floors, missing


FLOORS, MISSING = drawn_floors()


def floor_of(module: str) -> int | None:
    """The floor of ``module``: its own entry, else its package's (``isdpo.stages.sft`` -> ``stages/``)."""
    while module not in FLOORS and "." in module:
        module = module.rsplit(".", 1)[0]
    return FLOORS.get(module)


def test_the_drawing_has_its_floors_and_names_only_files_that_exist():
    # the parse saw the drawing's rules: the entry point on top, stages below it, the pure losses at the bottom
    assert FLOORS["launch"] == 0 and FLOORS["isdpo.stages"] == 1
    assert FLOORS["isdpo.losses"] == max(FLOORS.values()) > FLOORS["isdpo.stages"], FLOORS
    assert MISSING == [], "docs/architecture.md draws files that are gone"


def test_every_module_is_drawn_on_a_floor():
    undrawn = [m for m in sorted({**MODULES, **ENTRY}) if m != "isdpo" and floor_of(m) is None]
    assert undrawn == [], f"place these in docs/architecture.md's drawing: {undrawn}"


def test_a_module_imports_only_from_its_floor_or_below():
    up = [(m, floor_of(m), t, floor_of(t)) for m, path in {**MODULES, **ENTRY}.items() if m != "isdpo"
          if floor_of(m) is not None for t in edges(m, path) if floor_of(t) is not None and floor_of(t) < floor_of(m)]
    assert up == [], "(module, its floor, imported module, a floor above it); 0 = the top floor"


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
    assert {"isdpo.stages", "isdpo.schema"} <= graph["isdpo.config"]  # the walk read the package's imports


def test_function_local_imports_are_only_for_optional_heavy_dependencies():
    found = [(module_name(p), t) for p in MODULES.values() for t, _, is_local in imports(p) if is_local]
    assert found, "the scan found no function-local import at all: check it still parses the package"
    assert [f for f in found if f[1].startswith("isdpo")] == []
    assert [f for f in found if f[1] not in LAZY_OK] == []
    # Lazy only where it pays: a dependency some module imports at its top is loaded anyway.
    eager = [(module_name(p), t) for p in MODULES.values() for t, _, is_local in imports(p)
             if not is_local and t.split(".")[0] in {d.split(".")[0] for d in LAZY_OK}]
    assert eager == [], "an optional dependency imported at a module's top: import it where the feature runs"
    assert sorted({t for _, t in found}) == sorted(LAZY_OK), "LAZY_OK lists a dependency nothing imports lazily"


def test_no_private_name_is_imported_from_another_module():
    bad = [(module_name(p), t, n) for p in MODULES.values() for t, names, _ in imports(p)
           if t.startswith("isdpo") for n in names if n.startswith("_")]
    assert bad == []
