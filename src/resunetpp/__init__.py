"""resunetpp: ResUNet++ and its baselines for polyp segmentation in colonoscopy."""

from __future__ import annotations

from . import io, networks  # noqa: F401  (networks registers the models; io: resunetpp.io.read_image)
from .hub import list_pretrained, load_model, save_pretrained
from .inference import Segmenter
from .registry import count_parameters, create_model, list_models, model_info
from .version import __version__

__all__ = ["Segmenter", "__version__", "count_parameters", "create_model", "list_models", "list_pretrained",
           "load_model", "model_info", "save_pretrained"]
