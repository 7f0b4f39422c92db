"""The package's folders are its architecture: imports run one way, from the CLI down to the errors.

    cli -> ui -> {tools, train} -> run -> sapo -> models -> data -> config -> errors

A module may import from its own folder and from any floor below its own, never from above;
`tools` (what reads a finished run) and `train` (the loop) stand side by side and never import
each other, so a tool can never reach into the loop's internals. The web dashboard (`ui`) sits
beside the CLI, just under it: it calls what the CLI calls, and the CLI only starts it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sapo_lite"
FLOORS = {"errors": 0, "config": 1, "data": 2, "models": 3, "sapo": 4, "run": 5, "train": 6, "tools": 6, "ui": 7,
          "cli": 8}
TOP_LEVEL = {"__init__", "__main__"}  # the package's own entry points: above every floor


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every sapo_lite module `path` imports, relative imports resolved, lazy ones inside functions too."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:  # `from . import x, y`: each name is a module
                found.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "sapo_lite" or m.startswith("sapo_lite.")}


def floor_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_run_one_way():
    wrong = []
    arrows = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        source = floor_of(module_name(path))
        if source in TOP_LEVEL:
            continue
        assert source in FLOORS, f"{path} is in no known floor: add its folder to FLOORS in this test"
        for target_module in imported_modules(path):
            target = floor_of(target_module)
            arrows += 1
            if target == source:
                continue
            if target not in FLOORS or FLOORS[target] >= FLOORS[source]:
                wrong.append(f"{module_name(path)} ({source}) imports {target_module} ({target})")
    assert arrows > 100, "the walk found too few imports to mean anything"
    assert not wrong, "imports running up or sideways:\n" + "\n".join(wrong)


def test_the_walk_sees_lazy_and_relative_imports():
    """A check that finds nothing proves nothing: the loop's lazy and relative imports are seen."""
    loop = imported_modules(PACKAGE / "train" / "loop.py")
    assert "sapo_lite.sapo.buffer" in loop
    assert "sapo_lite.train.checkpoint" in loop
    cli_train = imported_modules(PACKAGE / "cli" / "train.py")
    assert "sapo_lite.train.loop" in cli_train  # imported inside the command function
    assert "sapo_lite.ui.server" in imported_modules(PACKAGE / "cli" / "ui.py")
    assert "sapo_lite.tools.buffer_view" in imported_modules(PACKAGE / "ui" / "pages" / "pairs.py")


def test_no_module_is_left_at_the_top():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP_LEVEL | {"errors"})
    assert not loose, f"modules outside any subpackage: {loose}"
