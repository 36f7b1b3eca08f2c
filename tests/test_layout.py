"""The package's shape: each subpackage imports only downward, without cycles, and alone.

Layers (../shared/DESIGN.md): ``demo``, ``bench``, ``serving``, ``eval`` -> ``training`` -> ``model`` /
``checkpoint`` -> the four top-level subpackages (``text_backbone``, ``encoders``, ``adapters``,
``datasets``); ``mm/cli.py`` above everything, imports nothing heavy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "mm": "mm",
    "text_backbone": "mm.text_backbone",
    "encoders": "mm.encoders",
    "adapters": "mm.adapters",
}
FOLDERS["datasets"] = "mm.datasets"
SUBPACKAGES = ("model", "checkpoint", "training", "serving", "eval", "bench", "demo")

#: Layer of each part of the package; a module may import its own layer or lower ones.
RANK = {
    "util": 0,  # mm itself (lazy names only) and its private helpers (mm._io, mm._strict, ...)
    "text_backbone": 1,
    "encoders": 1,
    "adapters": 1,
    "datasets": 1,
    "model": 2,
    "checkpoint": 2,
    "training": 3,
    "serving": 4,
    "eval": 4,
    "bench": 4,
    "demo": 4,
    "cli": 5,
}
#: Imports between two parts of one layer, by direction (the other direction is refused).
SIDEWAYS = {("checkpoint", "model"), ("demo", "serving"), ("demo", "eval"), ("bench", "serving")}
#: Imports inside functions that go up a layer, on purpose: the model's public methods
#: (``from_pretrained``, ``save_pretrained``, ``export_hf``, ``export_meta``) delegate to the folder
#: code, which builds models of the class it is handed; rejection sampling (``mm sample``, in
#: training) scores answers with the benchmarks' metric functions, which live with ``mm eval``.
LAZY_UPWARD = {("model", "checkpoint"), ("training", "eval")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    name = [*FOLDERS[parts[0]].split("."), *parts[1:]]
    return ".".join(name[:-1] if name[-1] == "__init__" else name)


MODULES = {_module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1].startswith("_"):  # mm's private helper modules (mm._io, mm._strict, ...)
        return "util"
    return parts[1]


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, inside-function) imports of ``mm`` modules; ``TYPE_CHECKING`` blocks ignored."""
    tree = ast.parse(path.read_text())
    top, inner = set(), set()

    def visit(node, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            names = []
            if (
                isinstance(child, ast.ImportFrom)
                and child.level == 0
                and (child.module or "").startswith("mm")
            ):
                names = [
                    f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in MODULES else child.module
                    for a in child.names
                ]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names if a.name.startswith("mm")]
            (inner if nested else top).update(n for n in names if n in MODULES)
            deeper = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, deeper)

    visit(tree, False)
    return top, inner


def _allowed(src: str, dst: str) -> bool:
    """Down a layer, or sideways where :data:`SIDEWAYS` allows it. The four top-level subpackages
    may use each other (the tokenizer, norms, audio decoding): the cycle test keeps them acyclic."""
    a, b = _part(src), _part(dst)
    return a == b or RANK[b] < RANK[a] or (a, b) in SIDEWAYS or RANK[a] == RANK[b] == 1


def test_every_import_goes_down_the_layers():
    wrong = []
    for name, path in MODULES.items():
        top, inner = _imports(path)
        wrong += [f"{name} -> {t}" for t in top if not _allowed(name, t)]
        wrong += [
            f"{name} -> {t} (in a function)"
            for t in inner
            if not _allowed(name, t) and (_part(name), _part(t)) not in LAZY_UPWARD
        ]
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles_between_modules():
    """Module-level imports, with a package's ``__init__`` counted as imported by its modules' users."""
    graph = defaultdict(set)
    for name, path in MODULES.items():
        for target in _imports(path)[0]:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ too
                graph[name].add(".".join(parts[:i]))
    graph = {k: {t for t in v if t != k and not k.startswith(t + ".")} for k, v in graph.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in list(graph):
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("package", ["mm", *(f"mm.{p}" for p in SUBPACKAGES), "mm.cli", "mm.datasets"])
def test_each_subpackage_imports_alone(package):
    done = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_mm_help_loads_no_torch():
    code = (
        "import sys\nfrom mm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "for command in ('demo', 'ask', 'serve', 'bench', 'train', 'info', 'average', 'eval', 'sample', 'data'):\n"
        "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'fastapi', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
