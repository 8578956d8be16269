"""Evaluation: the metrics (`metrics`, from per-image confusion counts) and the scoring of a trained model
on a dataset split with its reports (`evaluator`)."""

from resunetpp.evaluation.evaluator import evaluate

__all__ = ["evaluate"]
