"""The DDPM process of a diffusers scheduler config (``diffusers_scheduler``).

diffusers' DDPM-family schedulers (``DDPMScheduler``, ``DDIMScheduler``,
``DPMSolverMultistepScheduler``, ...) share one forward chain, set by ``num_train_timesteps``
T and ``beta_schedule`` (or ``trained_betas``): ``alphas_cumprod[k] = prod_{j <= k}
(1 - betas[j])`` for the timesteps ``k = 0..T-1``. That is dkit's ``ddpm`` process with the same
betas: dkit's step ``i = k + 1`` (at ``t = i / T``) has ``abar_i = alphas_cumprod[k]``
(:mod:`diffusers_kit.processes.ddpm`), which is how
:class:`~diffusers_kit.networks.diffusers_unet.DiffusersUNet` maps ``t`` to the timestep.

``beta_schedule`` maps to dkit's schedules: ``linear`` and ``scaled_linear`` to the same names,
``squaredcos_cap_v2`` (diffusers' ``betas_for_alpha_bar``, Nichol & Dhariwal 2021, eq. 17 with
``s = 0.008`` and betas clipped at 0.999) to ``cosine``. diffusers builds its tables in float32,
dkit in float64 from the same formulas (``tests/test_diffusers_import.py`` compares them).

Not read: ``rescale_betas_zero_snr`` (Lin et al. 2024) makes ``abar_T = 0``, i.e.
``alpha(1) = 0`` and ``beta_T = 1`` exactly, which a ``ddpm`` process refuses (every beta must lie
strictly between 0 and 1; its tables take ``log(1 - beta)``); such a config is refused. The
sampling options of a config (``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``,
``clip_sample``, ``thresholding``, ``prediction_type``) belong to solvers and the network, not
to the process: ``docs/diffusers.md`` says which dkit setting each corresponds to.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusers_kit.interop.diffusers_folder import (
    SCHEDULER_DEFAULTS,
    Fingerprint,
    LocalPath,
    check_class,
    read_scheduler_config,
)
from diffusers_kit.processes.ddpm import DDPM, cosine_betas, linear_betas, scaled_linear_betas
from diffusers_kit.processes.diffusers_flow import is_flow_config

#: Scheduler classes whose config is read (each compared with diffusers in the tests).
SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "UniPCMultistepScheduler",
)

#: diffusers' ``beta_schedule`` -> dkit's ``ddpm`` schedule.
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
             "squaredcos_cap_v2": "cosine"}


def scheduler_betas(config: dict[str, Any], where: str) -> tuple[torch.Tensor, str]:
    """``(betas, schedule)``: the float64 betas a DDPM-family scheduler config defines and the
    name of their dkit schedule (``custom`` for ``trained_betas``). ``where`` names the config
    file in errors."""
    setting = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if setting.get("rescale_betas_zero_snr"):
        raise ValueError(f"{where}: rescale_betas_zero_snr is set: the rescaled schedule has "
                         "zero terminal SNR (abar_T = 0, so alpha(1) = 0 and beta_T = 1 "
                         "exactly), which dkit's ddpm process cannot represent (every beta must "
                         "lie strictly between 0 and 1)")
    steps = setting["num_train_timesteps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{where}: num_train_timesteps must be a positive integer, "
                         f"given {steps!r}")
    trained = config.get("trained_betas")
    if trained is not None:
        try:
            betas = torch.tensor([float(b) for b in trained], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: trained_betas must be a list of numbers") from exc
        if len(betas) != steps:
            raise ValueError(f"{where}: {len(betas)} trained_betas for num_train_timesteps "
                             f"{steps}")
        return betas, "custom"
    name = setting["beta_schedule"]
    if name not in SCHEDULES:
        raise ValueError(f"{where}: beta_schedule {name!r} is not supported; dkit reads "
                         f"{', '.join(SCHEDULES)} or trained_betas")
    schedule = SCHEDULES[name]
    if schedule == "cosine":
        return cosine_betas(steps, offset=0.008, max_beta=0.999), schedule
    start, end = float(setting["beta_start"]), float(setting["beta_end"])
    make = linear_betas if schedule == "linear" else scaled_linear_betas
    return make(steps, start, end), schedule


class DiffusersSchedule(DDPM):
    """The ``ddpm`` process of a diffusers scheduler config: its T and its betas.

    Read from a local folder: a diffusers pipeline (its ``scheduler/scheduler_config.json``),
    a scheduler folder, or the ``scheduler_config.json`` file itself. Supported classes:
    ``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ``PNDMScheduler``,
    ``EulerDiscreteScheduler``, ``UniPCMultistepScheduler`` (one forward chain, whatever the
    sampler) with ``beta_schedule`` ``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` or
    ``trained_betas``. Step ``i`` (``t = i / T``) is the scheduler's timestep ``i - 1``.

    Args:
        path: a local diffusers pipeline folder, its ``scheduler/`` folder or the
            ``scheduler_config.json`` file (relative to the working directory).
        sha256: the :func:`~diffusers_kit.interop.diffusers_folder.fingerprint` of
            ``scheduler_config.json`` as ``dkit import`` found it; when set, a changed file is
            refused.
    """

    def __init__(self, path: LocalPath, sha256: Fingerprint | None = None) -> None:
        user = "diffusers_scheduler"
        file, config = read_scheduler_config(path, sha256, user)
        folder = file.parent
        if is_flow_config(config):
            raise ValueError(f"{user}: {file} is a flow-matching scheduler "
                             f"({config['_class_name']}); its path reaches alpha(1) = 0 and "
                             "is not a DDPM chain: read it with process kind diffusers_flow")
        name = check_class(config, SCHEDULERS, folder, user)
        betas, schedule = scheduler_betas(config, str(file))
        self.path = str(path)
        self.scheduler = name
        self.config = config
        self.schedule = schedule
        self._settings = {"schedule": schedule, "path": self.path}
        self._set_betas(betas)


def scheduler_config(process: DDPM, prediction_type: str) -> dict[str, Any]:
    """The DDPM-family scheduler config whose chain is ``process``'s, exactly: the inverse of
    :func:`scheduler_betas`. The process's named schedule (``beta_schedule`` with its
    ``beta_start`` / ``beta_end``) when :func:`scheduler_betas` rebuilds its float64 betas
    bit for bit from it, else ``trained_betas`` (every beta, as float64 decimal: JSON floats
    read back to the same numbers). ``prediction_type`` is diffusers' name of the network's
    prediction (``epsilon``, ``v_prediction`` or ``sample``). The sampling options are those
    that make diffusers' DDIM grid start at step T as dkit's grids do (``trailing``) and land
    on ``t = 0`` (DDIM's default ``set_alpha_to_one``), with no clipping."""
    steps = process.num_steps
    settings = {**getattr(process, "config", {}), **process._settings}
    schedule = {name: key for key, name in SCHEDULES.items()}.get(process.schedule)
    chain: dict[str, Any] = {"num_train_timesteps": steps}
    if schedule is not None:
        named = {**chain, "beta_schedule": schedule}
        if schedule != "squaredcos_cap_v2":
            named.update(beta_start=settings.get("beta_start"), beta_end=settings.get("beta_end"))
        try:
            rebuilt, _ = scheduler_betas(named, "the process's schedule")
        except (TypeError, ValueError):
            rebuilt = None
        if rebuilt is not None and torch.equal(rebuilt, process.betas):
            chain = named
    if "beta_schedule" not in chain:
        chain["trained_betas"] = [float(b) for b in process.betas]
    return {**chain, "prediction_type": prediction_type, "clip_sample": False,
            "timestep_spacing": "trailing"}
