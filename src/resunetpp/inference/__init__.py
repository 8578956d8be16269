"""Inference: the spec-driven `Segmenter` (`segmenter`) over its backends (`backends`), the model's input and
output transforms (`transforms`), and what the commands build on it: `predict`, `video`, `export`, overlays,
findings, COCO annotations and the optional CRF."""

from resunetpp.inference.backends import BACKENDS, PRECISIONS
from resunetpp.inference.segmenter import MIN_AREA, Segmenter

__all__ = ["BACKENDS", "MIN_AREA", "PRECISIONS", "Segmenter"]
