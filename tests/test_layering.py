"""The library's layering, read from its source: data flows one way (model -> capture -> analysis -> plots ->
report / CLI / dashboard), so no import circle, and the numbers never import the picture layer except
through a thin ``plot_*`` delegating method."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "sinkscope"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(current: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    if not prefix.startswith("sinkscope"):
        return []
    # "from . import plots" names a module; "from .analysis import X" names one module.
    return [f"{prefix}.{a.name}" if not node.module else prefix for a in node.names]


def _imports(path: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(module-level sinkscope imports, function name -> sinkscope modules it imports inside)."""
    tree = ast.parse(path.read_text())
    name, is_pkg = _module_name(path), path.name == "__init__.py"
    top: set[str] = set()
    local: dict[str, set[str]] = {}

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # typing only
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name)
                continue
            if isinstance(child, ast.ImportFrom):
                mods = _resolve(name, is_pkg, child)
                (top if func is None else local.setdefault(func, set())).update(mods)
            elif isinstance(child, ast.Import):
                mods = {a.name for a in child.names if a.name.startswith("sinkscope")}
                (top if func is None else local.setdefault(func, set())).update(mods)
            visit(child, func)

    visit(tree, None)
    return top, local


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        top, local = _imports(path)
        edges = top | set().union(*local.values()) if local else set(top)
        graph[name] = {m for m in edges if m in modules and m != name and not name.startswith(m + ".")
                       and m != "sinkscope"}
    return graph


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_numbers_import_the_picture_layer_only_in_plot_delegates():
    for name in ("analysis", "metrics", "capture", "scheme", "checks", "models", "streaming/evaluate",
                 "streaming/cache", "streaming/streamer", "streaming/memory"):
        top, local = _imports(PKG / f"{name}.py")
        assert "sinkscope.plots" not in top, name
        for func, mods in local.items():
            if "sinkscope.plots" in mods:
                assert func.startswith("plot_"), f"{name}.{func} imports plots"
