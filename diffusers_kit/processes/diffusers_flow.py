"""The rectified-flow process of a diffusers flow-matching scheduler config (``diffusers_flow``).

diffusers' flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``,
``FlowMatchHeunDiscreteScheduler``; Stable Diffusion 3, Esser et al. 2024) noise along the
straight line ``x_sigma = (1 - sigma) x_0 + sigma eps`` (their ``scale_noise``), and their models
predict its velocity ``d x_sigma / d sigma = eps - x_0`` (their ``step`` moves ``x`` by
``(sigma_next - sigma)`` times the model output). That is dkit's ``flow`` process with the
``linear`` path at ``t = sigma`` (``alpha(1) = 0`` exactly) and its ``velocity`` prediction,
same sign. The U-Net is called at timestep ``sigma T`` with ``T = num_train_timesteps``
(:func:`~diffusers_kit.networks.diffusers_unet.flow_timestep`).

The config's ``shift`` is SD3's time shift ``S`` (:func:`~diffusers_kit.processes.flow.
shift_time`): it becomes the process's ``shift``, and the process's default spacing is
``shifted``. ``set_timesteps(N)`` takes ``N`` values evenly from ``T sigma_max`` to ``T
sigma_min``, where ``sigma_max = S(1) = 1`` and ``sigma_min = S(1 / T)`` are the ends of the
config's training sigmas (already shifted), divides them by T and shifts them: ``sigma_k =
S(u_k)`` with ``u_k`` even from 1 to ``S(1 / T)``. Its last evaluation is therefore at
``S(S(1 / T))`` (0.0089 for T = 1000 and ``s = 3``, against ``S(1 / T) = 0.0030``), and that is
the process's ``t_min``: with it, dkit's ``shifted`` grid of N points is diffusers' grid
(``tests/test_diffusers_flow.py`` compares them).

Refused, with the reason: ``use_dynamic_shifting`` (the shift is computed per image resolution
by the pipeline and passed to ``set_timesteps`` as ``mu``; for the ``exponential`` shift type it
is the static shift ``s = e^mu``, which can be written into the config instead) and
``invert_sigmas`` (Mochi's models take ``1 - sigma``). The other sampling options of a config
(``shift_terminal``, ``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``,
``stochastic_sampling``) change diffusers' sampler, not the path; dkit's solvers do not read them
(``docs/diffusers.md``).
"""

from __future__ import annotations

from typing import Any

from diffusers_kit.interop.diffusers_folder import (
    Fingerprint,
    LocalPath,
    check_class,
    read_scheduler_config,
)
from diffusers_kit.processes.flow import Flow, shift_time

#: Flow-matching scheduler classes whose config is read.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")

#: diffusers' defaults of the settings read here.
FLOW_DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0}


def is_flow_config(config: dict[str, Any]) -> bool:
    """Whether a scheduler config is a flow-matching one (its class starts with ``FlowMatch``)."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def flow_settings(config: dict[str, Any], where: str) -> tuple[int, float, float]:
    """``(T, shift, t_min)`` of a flow-matching scheduler config: ``num_train_timesteps``, the
    time shift ``s`` and diffusers' last evaluation time ``S(S(1 / T))`` (module doc). ``where``
    names the config file in errors."""
    setting = {**FLOW_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if setting.get("use_dynamic_shifting"):
        raise ValueError(f"{where}: use_dynamic_shifting is set: the shift then depends on each "
                         "image's resolution, which the pipeline passes to set_timesteps as mu; "
                         "dkit needs a fixed shift. For time_shift_type exponential the shift is "
                         "s = exp(mu): set use_dynamic_shifting to false and shift to exp(mu) "
                         "of your resolution")
    if setting.get("invert_sigmas"):
        raise ValueError(f"{where}: invert_sigmas is set: the model is called at 1 - sigma "
                         "(Mochi), which dkit's flow-matching import does not map")
    steps = setting["num_train_timesteps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"{where}: num_train_timesteps must be an integer of at least 2, "
                         f"given {steps!r}")
    shift = setting["shift"]
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not 0 < shift <= 1000:
        raise ValueError(f"{where}: shift must be a number in (0, 1000], given {shift!r}")
    shift = float(shift)
    t_min = shift_time(shift_time(1.0 / steps, shift), shift)
    return steps, shift, t_min


class DiffusersFlow(Flow):
    """The ``flow`` process (linear path) of a diffusers flow-matching scheduler config.

    Read from a local folder: a diffusers pipeline (its ``scheduler/scheduler_config.json``),
    a scheduler folder, or the ``scheduler_config.json`` file itself, of a
    ``FlowMatchEulerDiscreteScheduler`` or ``FlowMatchHeunDiscreteScheduler``. ``t = sigma``;
    the config's ``shift`` is the process's, ``t_min`` is diffusers' last sigma and the default
    spacing is ``shifted``, so that a solver's ``spacing: auto`` is diffusers' grid (module doc).

    Args:
        path: a local diffusers pipeline folder, its ``scheduler/`` folder or the
            ``scheduler_config.json`` file (relative to the working directory).
        sha256: the :func:`~diffusers_kit.interop.diffusers_folder.fingerprint` of
            ``scheduler_config.json`` as ``dkit import`` found it; when set, a changed file is
            refused.
    """

    #: diffusers' grid: ``set_timesteps`` spaced in ``u``, then shifted (module doc).
    default_spacing = "shifted"

    def __init__(self, path: LocalPath, sha256: Fingerprint | None = None) -> None:
        user = "diffusers_flow"
        file, config = read_scheduler_config(path, sha256, user)
        folder = file.parent
        try:
            name = check_class(config, FLOW_SCHEDULERS, folder, user)
        except ValueError as exc:
            raise ValueError(f"{exc} (DDPM-family schedulers are process kind "
                             "diffusers_scheduler)") from None
        steps, shift, t_min = flow_settings(config, str(file))
        super().__init__("linear", t_min=t_min, shift=shift)
        self.folder = str(path)  # ``path`` is the flow's curve (``linear``)
        self.scheduler = name
        self.config = config
        self.num_train_timesteps = steps

    def __repr__(self) -> str:
        return (f"DiffusersFlow(folder={self.folder!r}, scheduler={self.scheduler!r}, "
                f"shift={self.shift}, t_min={self.t_min:.6g})")
