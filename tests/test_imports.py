"""The project's modules import in one direction: no circle, function-local imports included (they hide circles
from Python, not from readers)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("decode", "align", "data")


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (a package stands for its __init__)."""
    graph = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found |= {f"{node.module}.{a.name}" for a in node.names}  # `from decode import bild`
            graph[name] = {m for m in found if m.split(".")[0] in PACKAGES and m != name}
    return {name: {m for m in deps if m in graph} for name, deps in graph.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_no_import_circle():
    graph = project_imports()
    assert "decode.bild" in graph and "decode.compact" in graph["decode.fast"]
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_a_circle_is_found():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
