"""The project's import graph: no circle among its top-level modules, counting imports made
inside functions; `analysis` is a leaf, `visualization` imports only `analysis`, and only
`main` imports `experiment`. The size rule of the redesign: no class over 250 lines, no
function over 80 lines in the project's modules. And one owner for each concept: an enum,
registry, config section's values or checkpoint rule is defined by one module only, and
`utils` holds no config schema."""

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


# One owner for each concept (issue 25): an enum, a registry, a section's allowed values, a
# run-folder file name or a checkpoint rule is defined at module level by its owner only;
# the others import it. `config` checks the owners' values through `config.register_rules`.
OWNERS = {
    "MODEL_REGISTRY": "model", "ModelSpec": "model", "HEADS": "model", "POOLINGS": "model",
    "is_hub_id": "model", "prototype_head": "model",
    "HessianOptions": "trainer", "HESSIAN_METHODS": "trainer", "HESSIAN_METHOD": "trainer",
    "HEAD_INITS": "trainer", "HEAD_INIT": "trainer", "DIAGONAL_ESTIMATORS": "trainer",
    "PRECISIONS": "trainer", "OOM_ADVICE": "trainer", "outer_update": "trainer",
    "BASELINES": "baseline", "check_search": "evaluation",
    "ABLATION_KEYS": "experiment", "SEARCH_KEYS": "experiment",
    "Config": "config", "load_config": "config", "checkpoint_config": "config",
    "register_rules": "config",
    "CHECKPOINT_FORMAT": "runs", "CHECKPOINT_VERSION": "runs", "CHECKPOINT_KEYS": "runs", "RUN_MARKER": "runs",
    "load_checkpoint": "runs", "save_checkpoint": "runs", "saved_config": "runs",
    "prepare_run_dir": "runs", "open_run_dir": "runs",
    "MetricsSink": "metrics", "METRICS_FILE": "analysis",
    "mlflow_store": "mlflow_writer", "MLFLOW_DB": "mlflow_writer", "open_run": "mlflow_writer",
}
# config.yml's sections: a string constant in utils naming one of their keys is a section
# schema moved down into plumbing.
SECTIONS = ("models", "lora", "meta_learning", "tasks", "datasets", "synthetic", "training",
            "memory_optimization", "evaluation", "analysis", "tracking", "adapt")


def module_definitions(source: str) -> dict[str, ast.AST]:
    """Names a module defines at its top level (assignments, classes, functions) -> value node."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple) \
                        and len(target.elts) == len(node.value.elts):  # A, B = a, b
                    out.update({t.id: v for t, v in zip(target.elts, node.value.elts)
                                if isinstance(t, ast.Name)})
                    continue
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out[name.id] = node.value
    return out


def misplaced(sources: dict[str, str]) -> list[str]:
    """'module defines NAME (owner: other)' for each owned name defined outside its owner."""
    return [f"{m} defines {n} (owner: {OWNERS[n]})" for m, src in sources.items()
            for n in module_definitions(src) if n in OWNERS and OWNERS[n] != m]


def string_tuple(node) -> tuple | None:
    """The value of a literal tuple/list of two or more strings, else None."""
    if isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) >= 2 and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return tuple(e.value for e in node.elts)
    return None


def duplicated_enums(sources: dict[str, str]) -> list[str]:
    """'a.X == b.Y' for each literal string tuple defined at top level in two modules."""
    seen, out = {}, []
    for m, src in sorted(sources.items()):
        for name, value in module_definitions(src).items():
            if (values := string_tuple(value)) is not None:
                if values in seen:
                    out.append(f"{seen[values]} == {m}.{name}")
                seen.setdefault(values, f"{m}.{name}")
    return out


def config_keys_in(source: str) -> list[str]:
    """Dotted config keys ('section.key') in the string constants of a module's top level."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            found += [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)
                      and isinstance(c.value, str) and c.value.split(".")[0] in SECTIONS
                      and "." in c.value]
    return found


SOURCES = {m: (ROOT / f"{m}.py").read_text(encoding="utf-8") for m in MODULES}


def test_ownership_rules_catch_planted_violations():
    planted = {"utils": 'MODEL_REGISTRY = {}\nHEADS = ("euclidean", "cosine")\n'
                        'KEYS = ("lora.default_rank",)\nclass HessianOptions: pass\n',
               "model": 'HEADS = ("euclidean", "cosine")\n'}
    assert misplaced(planted) == ["utils defines MODEL_REGISTRY (owner: model)",
                                  "utils defines HEADS (owner: model)",
                                  "utils defines HessianOptions (owner: trainer)"]
    assert duplicated_enums(planted) == ["model.HEADS == utils.HEADS"]
    assert config_keys_in(planted["utils"]) == ["lora.default_rank"]
    assert misplaced({"model": 'HEADS = ("euclidean", "cosine")\n'}) == []


def test_each_concept_is_defined_by_its_owner_only():
    assert misplaced(SOURCES) == []
    assert duplicated_enums(SOURCES) == []


def test_utils_holds_no_config_schema():
    assert config_keys_in(SOURCES["utils"]) == []
    assert not [n for n in ("register_rules", "Rules") if n in SOURCES["utils"]]


def test_the_e2e_marker_finds_runs_launched_directly_through_helpers_and_fixtures(tmp_path, monkeypatch):
    """conftest marks `e2e` the tests that run a MELoRA command (main.main or a child process),
    also through a helper of their module or a fixture, and nothing else."""
    import importlib
    from conftest import launches_a_run
    (tmp_path / "probe_module.py").write_text(
        "import subprocess\nimport main\n"
        "def helper():\n    return main.main(['--mode', 'train'])\n"
        "def indirect():\n    return helper()\n"
        "def child():\n    subprocess.run(['python', 'main.py'])\n"
        "def unit():\n    return sorted([3, 1])\n"
        "def test_direct():\n    main.main([])\n"
        "def test_through_helpers():\n    indirect()\n"
        "def test_child():\n    child()\n"
        "def test_unit():\n    assert unit() == [1, 3]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("probe_module")
    marked = {name: launches_a_run(getattr(probe, name), probe)
              for name in ("test_direct", "test_through_helpers", "test_child", "test_unit")}
    assert marked == {"test_direct": True, "test_through_helpers": True, "test_child": True,
                      "test_unit": False}


def test_the_suite_marks_its_end_to_end_tests_and_only_those():
    import importlib
    from conftest import launches_a_run

    cli, distributed, exact = (importlib.import_module(name) for name in
                               ("test_cli", "test_distributed", "test_meta_gradient"))
    assert launches_a_run(cli.test_train_refuse_the_existing_run_then_resume, cli)
    assert launches_a_run(distributed.test_a_killed_rank_stops_every_process_promptly_with_a_one_line_reason,
                          distributed)
    assert not launches_a_run(distributed.test_meta_batch_must_split_evenly_over_processes, distributed)
    assert not any(launches_a_run(f, exact) for name, f in vars(exact).items()
                   if name.startswith("test_") and callable(f))
