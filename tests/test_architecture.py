"""The layout's promises (docs/DESIGN.md, "Architecture"), checked on the source itself:
no import cycle, the library never imports the study (nor matplotlib or papermill), no
private name used across modules, no module over 800 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cnn", "study")
MAX_LINES = 800


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def resolve(mod: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_package else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mod: str, path: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported module, name imported from it or None, line) for every import, nested too."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(mod, node, path.name == "__init__.py")
            for a in node.names:
                full = f"{target}.{a.name}"
                if full in known:  # "from pkg import module"
                    out.append((full, None, node.lineno))
                else:
                    out.append((target, a.name, node.lineno))
    return out


def project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def test_no_import_cycle():
    mods = modules()
    known = set(mods)
    graph = {m: sorted({t for t, _, _ in imports(m, p, known) if t in known and t != m})
             for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle through the package
    for m in graph:
        graph[m] = [t for t in graph[m] if not (m.startswith(t + ".") and t in PACKAGES
                                                 + tuple(k for k in known if "." in k))]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m)


def test_library_never_imports_the_study_or_plotting():
    mods = modules()
    bad = []
    for m, p in mods.items():
        if not m.startswith("cnn"):
            continue
        for target, _, line in imports(m, p, set(mods)):
            if target.split(".")[0] in ("study", "matplotlib", "papermill", "nbformat"):
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_importing_the_library_and_its_clis_loads_no_study_code():
    code = ("import sys, cnn, cnn.train, cnn.parallel.mpi, cnn.parallel.hogwild, "
            "cnn.parallel.kfold, cnn.parallel.costmodel\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('study', 'matplotlib', 'papermill'))\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_private_name_used_from_another_module():
    mods = modules()
    known = set(mods)
    bad = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text(), str(p))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(m, node, p.name == "__init__.py")
                for a in node.names:
                    full = f"{target}.{a.name}"
                    if full in known:
                        aliases[a.asname or a.name] = full
                    elif project(target) and a.name.startswith("_") and \
                            not a.name.startswith("__"):
                        bad.append(f"{p.relative_to(ROOT)}:{node.lineno} imports {a.name} "
                                   f"from {target}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if project(a.name):
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and node.attr.startswith("_") and \
                    not node.attr.startswith("__"):
                target = aliases[node.value.id]
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno} uses {target}.{node.attr}")
    assert not bad, "\n".join(sorted(set(bad)))


def private_definitions(tree: ast.AST) -> set[str]:
    """Private functions, methods, classes and assigned attributes a module defines."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_member_of_another_module_used_through_an_object():
    """``net._check_x()`` in mpi.py reaches into network.py: make the helper public."""
    mods = modules()
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in mods.items()}
    defined = {m: private_definitions(t) for m, t in trees.items()}
    bad = []
    for m, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in defined[m]:
                continue
            owners = [o for o, names in defined.items() if node.attr in names]
            if owners:
                bad.append(f"{mods[m].relative_to(ROOT)}:{node.lineno} uses .{node.attr} "
                           f"(defined in {', '.join(owners)})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_module_over_800_lines(pkg):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
