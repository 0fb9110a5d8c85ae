"""The layering of docs/architecture.md holds: every import points down, and no import cycles.

The import graph is read from the source (``ast``), counting module-level and
function-level (lazy) imports alike; imports under ``if TYPE_CHECKING:`` are
annotations only and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import flashdreams

PACKAGE_ROOT = Path(flashdreams.__file__).parent
LAYERS = ["core", "infra", "recipes", "session", "runner", "launch", "serve", "testing"]
"""Bottom to top: a layer may import its own modules and the layers before it."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = _imports(ast.parse(path.read_text(encoding="utf-8")))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_import_points_down():
    upward = []
    for module, targets in import_graph().items():
        own = _layer(module)
        for target in targets:
            layer = _layer(target)
            if own is not None and layer is not None and layer > own:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    # A package __init__ that re-exports its own submodules is not a cycle of behaviour.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
