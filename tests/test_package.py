"""The package's shape: the public API at the top, every 0.1 module path still importable (deprecated)."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

import resunetpp


def test_public_api_is_at_the_top_and_in_the_subpackages():
    from resunetpp.evaluation import evaluate
    from resunetpp.inference import Segmenter
    from resunetpp.training import TrainConfig, train

    assert resunetpp.Segmenter is Segmenter
    assert callable(resunetpp.create_model) and callable(resunetpp.load_model)
    assert callable(train) and callable(evaluate) and TrainConfig().model == "resunetpp"


@pytest.mark.parametrize("old", sorted(resunetpp.MOVED))
def test_old_module_paths_import_the_new_modules_with_a_deprecation_warning(old):
    new = importlib.import_module("resunetpp." + resunetpp.MOVED[old])
    if old == "inference":  # the old module's name is the new package's: its public names are there
        assert importlib.import_module("resunetpp.inference").Segmenter is new.Segmenter
        return
    sys.modules.pop(f"resunetpp.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"resunetpp.{old} is now resunetpp.{resunetpp.MOVED[old]}"):
        module = importlib.import_module(f"resunetpp.{old}")
    assert module is new
    sys.modules.pop(f"resunetpp.{old}", None)
    if getattr(resunetpp, old, None) is module:  # the import bound it on the package; leave no trace
        delattr(resunetpp, old)


# -- the house rules, checked on the source (issue 24) --
SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
           for p in (SRC / "resunetpp").rglob("*.py")}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
OPTIONAL = {"uvicorn", "resunetpp.serve", "py_sod_metrics", "matplotlib.pyplot", "onnx", "onnxruntime",
            "onnxruntime.quantization", "openvino", "pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils", "av",
            "torch.utils.tensorboard", "kornia"}  # kornia: 0.2 s more for every command, used by one preset


def functions():
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def test_no_function_is_longer_than_60_lines():
    long = [f"{m}.{f.name} ({f.end_lineno - f.lineno + 1})" for m, f in functions() if f.end_lineno - f.lineno >= 60]
    assert not long


def test_function_level_imports_are_few_and_only_of_optional_or_heavy_backends():
    inner = {(m, n.lineno, n.module if isinstance(n, ast.ImportFrom) else n.names[0].name)
             for m, f in functions() for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert len(inner) <= 20
    assert {what for _, _, what in inner} <= OPTIONAL


def test_no_import_cycle_between_modules():
    graph = {m: set() for m in MODULES}
    for m, tree in TREES.items():
        for node in tree.body:  # module level: what runs at import
            if isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in MODULES}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resunetpp"):
                graph[m] |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                             for a in node.names}

    def reaches(start, goal, seen):
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    assert not [m for m in MODULES if reaches(m, m, set())]
