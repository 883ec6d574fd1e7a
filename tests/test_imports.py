"""The package has no import cycle: the modules of lab/ form a layered graph, shared helpers below the methods.

The graph is read from the source with ``ast``, so an import inside a function counts too (that is how a cycle
hides: it works until someone moves the import to the top). Importing ``lab.a.b`` also runs ``lab/a/__init__.py``,
so it counts as an import of the package ``lab.a`` too.
"""

from __future__ import annotations

import ast
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent / "lab"


def module_names() -> dict[str, Path]:
    """``{"lab.tasks.bandit": path, "lab.tasks": lab/tasks/__init__.py, ...}``."""
    names = {}
    for path in LAB.rglob("*.py"):
        parts = list(path.relative_to(LAB.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imported(node: ast.AST, package: str) -> list[str]:
    """Dotted names an import statement may load: ``from lab.x import y`` -> lab.x and lab.x.y."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from .base import Task
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        return [module] + [f"{module}.{alias.name}" for alias in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    """``{module: the lab modules it imports anywhere in its source}``, parent packages included."""
    names = module_names()
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, package):
                while target and target not in names:  # lab.x.y where y is a function -> lab.x
                    target = target.rpartition(".")[0]
                parents = target.split(".")
                for i in range(2, len(parents) + 1):  # lab.a.b runs lab/a/__init__.py first (lab itself: no imports)
                    dep = ".".join(parents[:i])
                    # a module inside a package does not depend on its own package's __init__
                    if dep in names and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Depth-first search, three colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    """The checker itself: a → b → c → a is found; a diamond (a → b, a → c, b → d, c → d) is not a cycle."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_packages():
    """lab.dpo imports lab.batching at the top; lab.rewards imports lab.rm inside a function (a reward-model spec);
    importing lab.tasks.enumerable runs lab.tasks."""
    graph = import_graph()
    assert "lab.batching" in graph["lab.dpo"]
    assert "lab.rm" in graph["lab.rewards"]
    assert "lab.tasks" in graph["lab.config"] and "lab.tasks.enumerable" in graph["lab.evaluate"]
    assert "lab.tasks" in graph["lab.evaluate"]


def test_lab_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
