"""The package's folders are its layers: no import cycle, no import that runs up a layer.

Every module of ``hfcompress`` is read with ``ast`` (nothing is imported): module-level imports, imports
inside functions (the usual way a cycle hides), relative and absolute, and
``importlib.import_module("hfcompress...")`` string literals. An edge goes to the module named, or to the
submodule when ``from package import name`` names one; the parent packages that Python imports implicitly
are not edges (every module would otherwise depend on ``hfcompress/__init__.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hfcompress"

# Lowest first; a module may import its own layer (without cycles) or any layer below it.
LAYERS = [
    ("core", ["hfcompress.core"]),
    ("engines", ["hfcompress.quantization", "hfcompress.distillation"]),
    ("models", ["hfcompress.models"]),
    ("jobs", ["hfcompress.jobs"]),
    ("runs", ["hfcompress.runs"]),
    ("top", ["hfcompress.cli", "hfcompress.__main__", "hfcompress"]),
]


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no layer; add its folder to LAYERS"
    return best[0]


def imports_of(module: str, path: Path, modules: dict) -> set[tuple[str, int]]:
    """(imported module of the package, line) pairs, from every import statement anywhere in the file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()

    def add(name: str, line: int) -> None:
        # The longest prefix of `name` that is a module of the package.
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            found.add((".".join(parts), line))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hfcompress":
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hfcompress":
                continue
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    add(f"{target}.{alias.name}", node.lineno)
                else:
                    add(target, node.lineno)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and node.args[0].value.startswith("hfcompress")):
            add(node.args[0].value, node.lineno)
    found.discard((module, 0))
    return {(name, line) for name, line in found if name != module}


def import_graph(root: Path = PACKAGE) -> dict[str, set[tuple[str, int]]]:
    modules = module_names(root)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set]) -> list[str]:
    return sorted(f"{module} (layer {LAYERS[layer_of(module)][0]}) imports {target} (layer "
                  f"{LAYERS[layer_of(target)][0]}) at line {line}"
                  for module, edges in graph.items() for target, line in edges
                  if layer_of(target) > layer_of(module))


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_import_runs_up_the_layers():
    assert upward_imports(import_graph()) == []


def test_every_module_belongs_to_a_layer():
    for module in module_names():
        layer_of(module)


# ----- the checker itself finds what it is meant to find ------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "hfcompress" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "hfcompress"


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/loading.py": "def f():\n    from .reference import g\n",
        "models/reference.py": "from . import evaluate\n",
        "models/evaluate.py": "import hfcompress.models.loading\n",
    })
    assert cycles(import_graph(root)) == [
        ["hfcompress.models.evaluate", "hfcompress.models.loading", "hfcompress.models.reference"]]


def test_checker_finds_an_upward_import_and_an_import_module_literal(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/data.py": "import importlib\ndef f():\n    return importlib.import_module('hfcompress.runs.recipe')\n",
        "distillation/__init__.py": "",
        "distillation/student.py": "def f():\n    from ..models import loading\n",
        "models/__init__.py": "",
        "models/loading.py": "",
        "runs/__init__.py": "",
        "runs/recipe.py": "from ..core.data import f\n",
    })
    graph = import_graph(root)
    assert upward_imports(graph) == [
        "hfcompress.core.data (layer core) imports hfcompress.runs.recipe (layer runs) at line 3",
        "hfcompress.distillation.student (layer engines) imports hfcompress.models.loading (layer models) at line 2",
    ]
    assert cycles(graph) == [["hfcompress.core.data", "hfcompress.runs.recipe"]]
