"""The product's import graph: no cycles between modules, and the layers point one way.

Rules, over every import in the product packages (module level and inside functions alike: a
function-level import still ties the two modules together, it only hides a cycle until run time):
  * no import cycle between modules;
  * `client` and `trainer` never reach `serving` (the client library and the trainer work without
    the gateway's code; what they share with it lives in `contract`);
  * `contract` reaches none of `trainer`, `serving`, `client` (it is the leaf both sides build on);
  * no product package reaches `tests`.
"Reach" means directly or through other packages; a failure names the chain of modules.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = ("contract", "trainer", "serving", "client", "benchmarks", "loadtest")
# (importing package, imported package, why not)
FORBIDDEN = (
    ("client", "serving", "the client library must work without the gateway's code"),
    ("trainer", "serving", "training and export must work without the gateway's code"),
    ("contract", "trainer", "contract is the leaf that trainer, serving and client build on"),
    ("contract", "serving", "contract is the leaf that trainer, serving and client build on"),
    ("contract", "client", "contract is the leaf that trainer, serving and client build on"),
    *((package, "tests", "the product must not depend on its test suite") for package in PRODUCT_PACKAGES),
)


@dataclass
class ImportGraph:
    root: Path
    # module -> modules of this project it imports, each with where (path:line) it first does
    edges: dict[str, dict[str, str]] = field(default_factory=dict)

    def is_module(self, name: str) -> bool:
        path = self.root.joinpath(*name.split("."))
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    def is_project(self, name: str) -> bool:
        top = self.root / name.split(".")[0]
        return top.is_dir() or top.with_suffix(".py").is_file()


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(graph: ImportGraph, module: str, is_package: bool, node: ast.AST) -> list[str]:
    """The project modules one import statement loads (`from p import m` loads p.m when m is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative: from the module's own package, up level - 1
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    names = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        names.append(candidate if graph.is_module(candidate) else base)
    return names


def build_graph(root: Path, packages: tuple[str, ...]) -> ImportGraph:
    graph = ImportGraph(root)
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(root, path)
            edges = graph.edges.setdefault(module, {})
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):  # every import, at module level or inside functions
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                for name in imported_names(graph, module, path.name == "__init__.py", node):
                    if name and name != module and graph.is_project(name):
                        edges.setdefault(name, f"{path.relative_to(root)}:{node.lineno}")
    return graph


def strongly_connected(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's components of the graph restricted to its own nodes; only those that hold a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, {}):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def shortest_path(
    edges: dict[str, dict[str, str]], start: str, goal: Callable[[str], bool], allowed: set[str] | None = None
) -> list[str] | None:
    """Breadth-first from `start` to the first node for which goal(node) holds, through `allowed`."""
    previous: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for target in sorted(edges.get(node, {})):
            if allowed is not None and target not in allowed:
                continue
            if goal(target):
                path = [target, node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return path[::-1]
            if target not in seen:
                seen.add(target)
                previous[target] = node
                queue.append(target)
    return None


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def describe(graph: ImportGraph, chain: list[str]) -> str:
    """a -> b (a.py:3) -> c (b.py:7): each hop with the line that makes it."""
    hops = [chain[0]] + [f"{b} ({graph.edges[a][b]})" for a, b in zip(chain, chain[1:], strict=False)]
    return " -> ".join(hops)


def cycles(graph: ImportGraph) -> list[str]:
    """One chain per tangle of modules that import each other."""
    problems = []
    for component in strongly_connected(graph.edges):
        start = component[0]
        cycle = shortest_path(graph.edges, start, lambda m, s=start: m == s, allowed=set(component))
        assert cycle is not None
        problem = f"import cycle: {describe(graph, cycle)}"
        if len(component) > len(cycle) - 1:  # more modules are tangled than this one loop shows
            problem += f" (one tangle of {len(component)} modules: {', '.join(component)})"
        problems.append(problem)
    return problems


def chains(graph: ImportGraph, source: str, target: str) -> list[list[str]]:
    """Each way package `source` reaches package `target`, directly or through other packages; one
    chain per import that leaves `source`, so a chain is not repeated for every module behind it."""
    found = []
    for module in sorted(m for m in graph.edges if in_package(m, source)):
        for first in sorted(graph.edges[module]):
            if in_package(first, source):
                continue
            if in_package(first, target):
                found.append([module, first])
            elif rest := shortest_path(graph.edges, first, lambda m: in_package(m, target)):
                found.append([module, *rest])
    return found


def violations(graph: ImportGraph, forbidden: tuple[tuple[str, str, str], ...] = FORBIDDEN) -> list[str]:
    problems = cycles(graph)
    for source, target, why in forbidden:
        for chain in chains(graph, source, target):
            problems.append(f"{source} reaches {target} ({why}): {describe(graph, chain)}")
    return problems


def test_product_import_graph_has_no_cycles_and_keeps_its_layers() -> None:
    graph = build_graph(PROJECT_ROOT, PRODUCT_PACKAGES)
    assert len(graph.edges) > 20, "the walk found almost no modules: is PROJECT_ROOT right?"
    problems = violations(graph)
    assert not problems, "\n".join(problems)


# The checker itself, on small packages written for the purpose: it must be able to fail.


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_reports_a_cycle_closed_by_a_function_level_import(tmp_path: Path) -> None:
    root = write_package(tmp_path, {
        "app/__init__.py": "",
        "app/train.py": "from app.evaluate import evaluate\n",
        "app/evaluate.py": "def evaluate():\n    from app import train\n    return train\n",
        "app/other.py": "import json\nfrom . import train\n",  # into the cycle, not part of it
    })  # fmt: skip
    problems = violations(build_graph(root, ("app",)), forbidden=())
    assert problems == [
        "import cycle: app.evaluate -> app.train (app/evaluate.py:2) -> app.evaluate (app/train.py:1)"
    ]


def test_checker_reports_a_forbidden_import_directly_and_through_a_chain(tmp_path: Path) -> None:
    root = write_package(tmp_path, {
        "client/__init__.py": "",
        "client/images.py": "import numpy\n\ndef load():\n    from serving.preprocess import fit\n",
        "client/cli.py": "from helpers import util\n",
        "helpers/__init__.py": "",
        "helpers/util.py": "from serving import preprocess\n",
        "serving/__init__.py": "",
        "serving/preprocess.py": "from client import images\n",
    })  # fmt: skip
    rule = (("client", "serving", "no gateway code in the client"),)
    problems = violations(build_graph(root, ("client", "helpers", "serving")), forbidden=rule)
    assert "client reaches serving (no gateway code in the client): client.images -> serving.preprocess " \
           "(client/images.py:4)" in problems
    assert "client reaches serving (no gateway code in the client): client.cli -> helpers.util " \
           "(client/cli.py:1) -> serving.preprocess (helpers/util.py:1)" in problems
    assert any(p.startswith("import cycle: client.images -> serving.preprocess") for p in problems), problems
    assert len(problems) == 3, problems


def test_checker_passes_a_clean_package(tmp_path: Path) -> None:
    root = write_package(tmp_path, {
        "contract/__init__.py": "",
        "contract/names.py": "SIZE = 32\n",
        "client/__init__.py": "from client.http import get\n",
        "client/http.py": "import requests\nfrom contract.names import SIZE\n\ndef get():\n    return SIZE\n",
    })  # fmt: skip
    graph = build_graph(root, ("contract", "client"))
    assert graph.edges["client.http"] == {"contract.names": "client/http.py:2"}
    assert violations(graph) == []


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("from . import b", "pkg.sub.b"),
        ("from .b import thing", "pkg.sub.b"),
        ("from .. import top", "pkg.top"),
        ("from ..sub import b", "pkg.sub.b"),
        ("from pkg.sub import NAME", "pkg.sub"),
        ("import pkg.sub.b", "pkg.sub.b"),
    ],
)
def test_checker_resolves_relative_and_attribute_imports(
    tmp_path: Path, statement: str, expected: str
) -> None:
    root = write_package(tmp_path, {
        "pkg/__init__.py": "", "pkg/top.py": "", "pkg/sub/__init__.py": "NAME = 1\n", "pkg/sub/b.py": "",
        "pkg/sub/a.py": f"{statement}\n",
    })  # fmt: skip
    assert set(build_graph(root, ("pkg",)).edges["pkg.sub.a"]) == {expected}
