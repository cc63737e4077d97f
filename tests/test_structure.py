"""The project's import graph: no circle among its top-level modules, counting imports made
inside functions; `analysis` is a leaf, `visualization` imports only `analysis`, and only
`main` imports `experiment`. And the size rule of the redesign: no class over 250 lines, no
function over 80 lines in the project's modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def project_imports(module: str) -> set[str]:
    """Every project module `module` imports, anywhere in the file (functions included)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & set(MODULES)) - {module}


GRAPH = {m: project_imports(m) for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules forming a circle (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_detects_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_layering():
    assert GRAPH["analysis"] == set()
    assert GRAPH["utils"] == set()
    assert GRAPH["visualization"] == {"analysis"}
    assert {m for m, deps in GRAPH.items() if "experiment" in deps} == {"main"}


MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 80


def oversized(source: str, name: str) -> list[str]:
    """'name:Unit (lines)' for each class over MAX_CLASS_LINES and function over
    MAX_FUNCTION_LINES (decorators and docstrings count)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else
                 MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
        if limit is not None:
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append(f"{name}:{node.name} ({lines} lines)")
    return out


def test_size_rule_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert oversized(f"def f():\n{body}\n", "m") == [f"m:f ({MAX_FUNCTION_LINES + 1} lines)"]
    assert oversized("def g():\n    return 1\n", "m") == []


def test_no_oversized_class_or_function():
    found = [u for m in MODULES for u in oversized((ROOT / f"{m}.py").read_text(encoding="utf-8"), m)]
    assert found == [], found
