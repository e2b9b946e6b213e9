"""Deprecated location: the Python API (:class:`~diffusers_kit.diffusion.Diffusion` and its
sampling helpers) lives in :mod:`diffusers_kit.diffusion` since 0.3. Its names are re-exported
here so that scripts and plugins importing ``diffusers_kit.api`` keep working; new code imports
``from diffusers_kit import Diffusion`` or from :mod:`diffusers_kit.diffusion`."""

from __future__ import annotations

from diffusers_kit.diffusion import (  # noqa: F401
    DEFAULT_BATCH_VALUES,
    DEFAULT_MAX_BATCH,
    Diffusion,
    PluginOutputError,
    ProgressBar,
    SamplingOutOfMemory,
    batch_count,
    checked_output,
    default_batch_size,
    progress_bar,
    resolve_device,
)
