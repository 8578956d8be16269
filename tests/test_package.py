"""The package's shape: the public API at the top, every 0.1 module path still importable (deprecated)."""

import importlib
import sys

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
