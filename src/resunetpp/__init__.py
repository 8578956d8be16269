"""resunetpp: ResUNet++ and its baselines for polyp segmentation in colonoscopy."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import io, networks  # noqa: F401  (networks registers the models; io: resunetpp.io.read_image)
from .hub import list_pretrained, load_model, save_pretrained
from .inference import Segmenter
from .registry import count_parameters, create_model, list_models, model_info

try:
    __version__ = version("resunetpp")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["Segmenter", "__version__", "count_parameters", "create_model", "list_models", "list_pretrained",
           "load_model", "model_info", "save_pretrained"]
