"""Experiment trackers: where a run's loss, learning rate, metrics and samples are sent.

A spec enables them in its ``track`` list (``track: [{kind: tensorboard}, {kind: mlflow}]``).
They are components of kind ``tracker``, registered by the built-in plugin like every other
component, and fed by the built-in plugin's life-cycle hooks (:mod:`diffusers_kit.tracking.
hooks`). A plugin adds its own tracker by registering a :class:`Tracker` subclass under kind
``tracker``.
"""

from diffusers_kit.tracking.base import Tracker, missing_extra
from diffusers_kit.tracking.mlflow import MLflow
from diffusers_kit.tracking.tensorboard import TensorBoard

__all__ = ["MLflow", "TensorBoard", "Tracker", "missing_extra"]

REGISTER = [
    ("tracker", "tensorboard", TensorBoard),
    ("tracker", "mlflow", MLflow),
]
