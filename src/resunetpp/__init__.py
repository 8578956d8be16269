"""resunetpp: ResUNet++ and its baselines for polyp segmentation in colonoscopy.

The subpackages show the layers: `networks` (the architectures and their registry), `data` (readers, checks,
splits, augmentation), `training`, `inference`, `evaluation`, `serve` and `cli`; `spec` and `hub` are the
trained model's contract and its files.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from resunetpp import io, networks  # noqa: F401  (networks registers the models; io: resunetpp.io.read_image)
from resunetpp.hub import list_pretrained, load_model, save_pretrained
from resunetpp.inference import Segmenter
from resunetpp.networks.registry import count_parameters, create_model, list_models, model_info
from resunetpp.version import __version__

__all__ = ["Segmenter", "__version__", "count_parameters", "create_model", "list_models", "list_pretrained",
           "load_model", "model_info", "save_pretrained"]

# the flat modules of 0.1 and their homes now: `import resunetpp.train` still works, with a DeprecationWarning
MOVED = {
    "config": "training.config", "runtime": "training.runtime", "train": "training.loop",
    "losses": "training.losses", "distill": "training.distill", "reproduce": "training.reproduce",
    "inference": "inference.segmenter", "preprocess": "inference.transforms", "predict": "inference.predict",
    "video": "inference.video", "export": "inference.export", "crf": "inference.crf",
    "overlay": "inference.overlay", "findings": "inference.findings", "coco": "inference.coco",
    "metrics": "evaluation.metrics", "evaluate": "evaluation.evaluator", "registry": "networks.registry",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `resunetpp.<old>` for the modules in MOVED and hands out the module at its new path."""

    def find_spec(self, name, path=None, target=None):
        old = name.partition("resunetpp.")[2] if name.startswith("resunetpp.") else ""
        if old in MOVED and old != "inference":  # resunetpp.inference is a package now, found as usual
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = "resunetpp." + MOVED[spec.name.partition(".")[2]]
        warnings.warn(f"{spec.name} is now {new}; the old path will be removed in resunetpp 0.3",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the new module is already executed


sys.meta_path.insert(0, _MovedModules())
