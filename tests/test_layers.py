"""The tree shows the design: each package imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "gateway"
# Lowest first. A module may import its own layer and the ones before it.
LAYERS = [
    {"errors", "types", "hooks"},
    {"config"},
    {"core"},
    {"obs"},
    {"store"},
    {"upstream"},
    {"ledger"},  # PostgreSQL's copy of the spend: read by http (/api/spend) and serve
    {"alerts"},  # webhook alerts: the outbox streams and their sender, run by serve
    {"http"},
    {"demo"},  # the demo app and mock upstream: built from http, run by serve
    {"serve"},
]


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gateway"):
            base = node.module
            if base == "gateway":
                found.update(f"gateway.{alias.name}" for alias in node.names)
            else:
                found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gateway."))
    return found


def test_imports_only_go_down_the_layers() -> None:
    wrong = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(relative.parts)
        if module in ("gateway.__init__", "gateway.__main__"):
            continue  # the package's front door and entry point sit above everything
        own = layer_of(module)
        for target in imports(path):
            if layer_of(target) > own:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_module_is_over_400_lines() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
             for p in ROOT.rglob("*.py")}
    assert all(n <= 400 for n in sizes.values()), {k: v for k, v in sizes.items() if v > 400}
