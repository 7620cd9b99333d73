"""The import graph ARCHITECTURE.md describes: layered, no cycles, the loops imported only from above."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """{module: toolkit modules it imports anywhere in its body (function-level imports too)}."""
    files = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for p in (ROOT / "toolkit").rglob("*.py") if "configs" not in p.relative_to(ROOT).parts}
    names = set(files.values())
    graph = {}
    for path, name in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toolkit"):
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("toolkit")}
        graph[name] = {m for m in found if m in names and m != name and m != "toolkit"}
    return graph


def test_no_import_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_layers_import_only_downwards():
    """Basics and data never import the loops, evaluation, artifacts or entry points; the loops
    (toolkit.engine) are imported only by the recipes and benchmarks; the recipes only by the CLI."""
    graph = import_graph()
    top = ("toolkit.cli", "toolkit.__main__", "toolkit.recipes", "toolkit.bench", "toolkit.sweep")
    basics = ("toolkit.errors", "toolkit.files", "toolkit.progress", "toolkit.distributed", "toolkit.data", "toolkit.config",
              "toolkit.knn", "toolkit.search", "toolkit.retrieval", "toolkit.losses", "toolkit.objectives", "toolkit.models")
    for module, deps in graph.items():
        for dep in deps:
            if dep.startswith("toolkit.engine"):
                assert module.startswith(("toolkit.engine", "toolkit.recipes", "toolkit.bench")), f"{module} imports {dep}"
            if dep.startswith("toolkit.recipes"):
                assert module.startswith(("toolkit.cli", "toolkit.recipes")), f"{module} imports {dep}"
            if module.startswith(basics):
                assert dep.startswith(basics), f"{module} (a basic layer) imports {dep}"
            assert not dep.startswith(top) or module.startswith(top), f"{module} imports the entry point {dep}"


def test_run_file_names_are_spelled_only_in_artifacts():
    names = ("best_embedder.pt", "best_head.pt", "metrics.jsonl", "summary.json", "latest.json", "report.json", "report.md")
    offenders = []
    for path in (ROOT / "toolkit").rglob("*.py"):
        if path.name == "artifacts.py" or "configs" in path.relative_to(ROOT).parts:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n in node.value]
    for path in (ROOT / "launch").glob("*.py"):
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if f'"{n}"' in path.read_text()]
    assert offenders == []
