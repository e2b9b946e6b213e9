"""A diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` as a dkit network
(``diffusers_unet``).

The U-Net is loaded from a local folder (a pipeline saved with ``save_pretrained``, or its
``unet/`` folder) with safetensors only, and called as diffusers' pipelines call it, with a
discrete timestep. dkit's DDPM step ``i`` sits at ``t = i / T`` (:mod:`diffusers_kit.processes.
ddpm`, ``i = 1..T``) and has ``abar_i = prod_{j <= i} (1 - beta_j)``, which diffusers stores as
``alphas_cumprod[i - 1]`` at timestep ``i - 1``; so the network is given::

    timestep = t T - 1

snapped to the nearest integer when ``t`` is within float32 rounding of a step (the U-Net then
sees exactly the integer timestep a diffusers pipeline passes), and fractional between steps
(the sinusoidal timestep embedding is defined for real timesteps; continuous-time solvers
evaluate there). T and the parameterisation come from the pipeline's scheduler config:
``prediction_type`` ``epsilon`` / ``v_prediction`` / ``sample`` is dkit's ``eps`` / ``v`` /
``x0``; diffusers' velocity ``sqrt(abar) eps - sqrt(1 - abar) x0`` is dkit's
``v = alpha eps - sigma x0`` (Salimans & Ho 2022).

A ``UNet2DConditionModel`` (Stable Diffusion's, Rombach et al. 2022) attends to a context
sequence: a nested conditioner (``diffusers_text``: the pipeline's own text encoder, one prompt
per label) gives it, as ``encoder_hidden_states``, for the label ``y`` (the null label's
context when ``y`` is None), so classifier-free guidance with the empty or a negative prompt is
dkit's one ``classifier_free`` guidance term.

A flow-matching model (its scheduler a ``FlowMatch...`` class; :mod:`diffusers_kit.processes.
diffusers_flow`) predicts the velocity ``eps - x0`` of the line ``x_sigma = (1 - sigma) x0 + sigma
eps``, dkit's ``velocity`` on the ``flow`` process at ``t = sigma``, and is called at timestep
``sigma T`` (diffusers' ``timesteps = sigmas * num_train_timesteps``)::

    timestep = t T                   (prediction ``velocity``)

not snapped: diffusers passes the real number. ``prediction: velocity`` is what selects this
mapping (no DDPM-family scheduler has such a prediction).

Needs the optional ``diffusers`` dependency (``pip install diffusers_kit[diffusers]``), imported
only when a ``diffusers_unet`` is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from diffusers_kit.conditioners.base import Conditioner
from diffusers_kit.interop.diffusers_folder import (
    MODEL_CONFIG,
    SCHEDULER_DEFAULTS,
    ByteCount,
    Fingerprint,
    LocalPath,
    check_class,
    component_folder,
    forgive_referenced,
    load_model,
    read_json,
    scheduler_near,
)
from diffusers_kit.networks.base import Network
from diffusers_kit.processes.ddpm import MAX_STEPS
from diffusers_kit.processes.diffusers_flow import is_flow_config

MISSING = ("diffusers_unet needs the diffusers library, which is not installed: install the "
           "optional 'diffusers' extra: pip install diffusers_kit[diffusers]")

#: the U-Net classes read, and which of them attends to a context (encoder_hidden_states)
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
CONDITIONAL = "UNet2DConditionModel"
#: UNet2DConditionModel options whose extra inputs (SDXL's added time ids, image embeddings,
#: LCM's guidance embedding) dkit does not pass
EXTRA_INPUTS = ("addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")

#: diffusers' ``prediction_type`` -> dkit's prediction.
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def diffusers_timestep(t: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``t T - 1`` (float32), snapped to the nearest integer within float32 rounding of ``t``
    (``t`` is a float32 ``i / T`` on the sampling path: ``|t T - i| <= T 2^-24``)."""
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    position = t.to(dtype) * num_steps
    nearest = torch.round(position)
    snapped = torch.where((position - nearest).abs() <= 1e-4 + num_steps * 2.0**-22,
                          nearest, position)
    return (snapped - 1.0).to(torch.float32)


def flow_timestep(t: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``t T`` (float32): a flow-matching scheduler's timestep ``sigma T`` at ``t = sigma``."""
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    return (t.to(dtype) * num_steps).to(torch.float32)


class DiffusersUNet(Network):
    """A diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` read from a local folder,
    called at timestep ``t T - 1`` (a flow-matching model, ``prediction: velocity``: ``t T``).

    The module doc gives the mapping of ``t`` to the timestep.

    Class-conditional U-Nets (``num_class_embeds``) take labels ``0..num_class_embeds - 1``;
    they have no null class, so they always need labels (and classifier-free guidance, which
    needs one, is refused). A ``UNet2DConditionModel`` needs a ``conditioner`` whose width is
    its ``cross_attention_dim``: the label picks the context (a prompt), the null label the
    conditioner's null context (the negative or empty prompt), which classifier-free guidance
    uses; with ``num_class_embeds`` as well, the label is also the class label (one prompt per
    class). The weights are the U-Net's own parameters: training fine-tunes them, and a run's
    checkpoint holds them.

    Args:
        path: a local diffusers pipeline folder (``save_pretrained``; its ``unet/`` is read) or
            a ``unet`` folder itself, relative to the working directory. Weights are read from
            ``diffusion_pytorch_model.safetensors`` only (never pickle files).
        prediction: ``auto`` reads ``prediction_type`` from the pipeline's scheduler config
            (``epsilon`` -> ``eps``, ``v_prediction`` -> ``v``, ``sample`` -> ``x0``; a
            flow-matching scheduler: ``velocity``, called at timestep ``t T``); or set it here.
        num_train_timesteps: the scheduler's T, which maps ``t`` to the timestep; default:
            read from the pipeline's scheduler config. It must equal the process's
            ``num_steps``.
        sha256: the weights as ``dkit import`` found them: the
            :func:`~diffusers_kit.interop.diffusers_folder.fingerprint` of ``unet/config.json``
            and the weight file(s). When set, the files are checked against it (and ``size``,
            their total byte count) before they are loaded, and a checkpoint may leave the
            U-Net's weights out: a state dict without any of them leaves the network with the
            file's weights (``load_state_dict`` does not count them missing). A checkpoint
            that holds them (a fine-tuned run) loads them as usual.
        size: the total byte count of those files (checked first, without reading them).
        conditioner: the context of a ``UNet2DConditionModel`` (e.g. ``{kind: diffusers_text,
            path: ..., prompts: [...]}``); a ``UNet2DModel`` takes none.
        class_dropout: how often the null context replaced the label when the U-Net was
            trained (and is replaced when it is fine-tuned). Stable Diffusion dropped the text
            10 % of the time: above 0, the null context is a trained condition, so
            classifier-free guidance is allowed. Ignored without a conditioner, and 0 for a
            U-Net with class embeddings (they have no null class).
    """

    def __init__(
        self,
        path: LocalPath,
        prediction: Literal["auto", "eps", "v", "x0", "velocity"] = "auto",
        num_train_timesteps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None,
        sha256: Fingerprint | None = None,
        size: ByteCount | None = None,
        conditioner: Conditioner | None = None,
        class_dropout: Annotated[float, Field(ge=0, le=1)] = 0.1,
        *,
        data_shape: tuple[int, ...] | None = None,
    ) -> None:
        user = "diffusers_unet"
        folder = component_folder(path, "unet", MODEL_CONFIG, user)
        config = read_json(folder / MODEL_CONFIG)
        conditional = check_class(config, UNET_CLASSES, folder, user) == CONDITIONAL
        if config.get("time_embedding_type", "positional") != "positional":
            raise ValueError(f"{user}: {folder}: time_embedding_type "
                             f"{config['time_embedding_type']!r} is not supported (only "
                             "'positional', the timestep embedding of DDPM-family models)")
        if config.get("class_embed_type") is not None:
            raise ValueError(f"{user}: {folder}: class_embed_type "
                             f"{config['class_embed_type']!r} is not supported (only class "
                             "labels through num_class_embeds)")
        self._check_conditioner(config, conditional, conditioner, folder, user)
        scheduler = scheduler_near(folder)
        scheduler_config = None
        if scheduler is not None:
            scheduler_config = {**SCHEDULER_DEFAULTS, **read_json(scheduler)}
        prediction = self._prediction(prediction, scheduler_config, folder, user)
        if num_train_timesteps is not None:
            steps = num_train_timesteps
        elif scheduler_config is not None:
            steps = scheduler_config["num_train_timesteps"]
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ValueError(f"{user}: {scheduler}: num_train_timesteps must be a positive "
                                 f"integer, given {steps!r}")
        else:
            raise ValueError(f"{user}: {folder} has no scheduler config beside it (../scheduler/"
                             "scheduler_config.json) to read num_train_timesteps from; set "
                             "num_train_timesteps (and prediction)")
        channels = int(config.get("in_channels", 3))
        if int(config.get("out_channels", channels)) != channels:
            raise ValueError(f"{user}: {folder}: out_channels ({config.get('out_channels')}) "
                             f"differs from in_channels ({channels}); learned variances are "
                             "not supported")
        side = config.get("sample_size")
        own = (channels, *((side, side) if isinstance(side, int) else tuple(side or ())))
        shape = own if data_shape is None else tuple(int(s) for s in data_shape)
        factor = 2 ** (len(config.get("block_out_channels", ())) - 1)
        if len(shape) != 3 or shape[0] != channels or shape[1] % factor or shape[2] % factor:
            raise ValueError(f"{user}: the U-Net in {folder} takes images of {channels} "
                             f"channels with sides divisible by {factor} (it was built for "
                             f"{own}); this data set's examples have shape {shape}")
        unet = load_model(folder, config["_class_name"], sha256, size, user, MISSING)
        super().__init__(prediction)
        self.unet = unet
        self.path = str(path)
        self.num_steps = int(steps)
        self.data_shape = shape
        self.class_embeds = config.get("num_class_embeds")
        self.conditioner = conditioner
        self.num_classes = self.class_embeds
        if conditioner is not None:
            self.num_classes = conditioner.num_classes
            self.class_dropout = 0.0 if self.class_embeds is not None else float(class_dropout)
            conditioner.drop_prob = self.class_dropout
        self.referenced = sha256 is not None
        if self.referenced:
            self.register_load_state_dict_post_hook(DiffusersUNet._weights_from_file)

    def _weights_from_file(self, incompatible: Any) -> None:
        """A state dict that holds none of the U-Net's tensors (the checkpoint of an imported
        run) leaves the weights read from the verified file (:func:`~diffusers_kit.interop.
        diffusers_folder.forgive_referenced`)."""
        forgive_referenced(self.unet, "unet.", incompatible)

    @staticmethod
    def _check_conditioner(config: dict[str, Any], conditional: bool,
                           conditioner: Conditioner | None, folder: Path, user: str) -> None:
        """A ``UNet2DConditionModel`` needs a conditioner of its context width (and, with class
        embeddings, one context per class); a ``UNet2DModel`` takes none."""
        if not conditional:
            if conditioner is not None:
                raise ValueError(f"{user}: the UNet2DModel in {folder} attends to no context; "
                                 "leave conditioner out (a UNet2DConditionModel takes one)")
            return
        for option in EXTRA_INPUTS:
            if config.get(option) is not None:
                raise ValueError(f"{user}: {folder}: {option} {config[option]!r} is not "
                                 "supported (its extra inputs are not passed; Stable "
                                 "Diffusion 1.x / 2.x U-Nets have none)")
        if conditioner is None:
            raise ValueError(f"{user}: the UNet2DConditionModel in {folder} attends to a "
                             "context: set conditioner, e.g. {kind: diffusers_text, path: "
                             f"{str(folder.parent)!r}, prompts: [...]}}")
        width = config.get("cross_attention_dim")
        if width != conditioner.dim:
            raise ValueError(f"{user}: the U-Net in {folder} attends to a context of width "
                             f"{width} (cross_attention_dim); its conditioner gives width "
                             f"{conditioner.dim}")
        embeds = config.get("num_class_embeds")
        if embeds is not None and conditioner.num_classes != embeds:
            raise ValueError(f"{user}: the U-Net in {folder} has {embeds} class embeddings; "
                             f"its conditioner has {conditioner.num_classes} labels (give one "
                             "prompt per class)")

    @staticmethod
    def _prediction(prediction: str, scheduler: dict | None, folder: Path, user: str) -> str:
        if prediction != "auto":
            return prediction
        if scheduler is None:
            raise ValueError(f"{user}: {folder} has no scheduler config beside it (../scheduler/"
                             "scheduler_config.json) to read prediction_type from; set "
                             "prediction (eps, v, x0, or velocity for a flow-matching model)")
        if is_flow_config(scheduler):
            return "velocity"
        kind = scheduler["prediction_type"]
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"{user}: {folder}: the scheduler's prediction_type {kind!r} is not "
                             f"supported (one of {', '.join(PREDICTION_TYPES)})")
        return PREDICTION_TYPES[kind]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        labels = None
        if self.class_embeds is not None:
            if y is None or bool((y >= self.class_embeds).any()):
                raise ValueError(f"the diffusers U-Net in {self.path} needs class labels "
                                 f"0..{self.class_embeds - 1}; it has no null (unconditional) "
                                 "class")
            labels = y.long()
        if self.prediction == "velocity":
            timestep = flow_timestep(t, self.num_steps)
        else:
            timestep = diffusers_timestep(t, self.num_steps)
        if self.conditioner is None:
            return self.unet(x, timestep, class_labels=labels, return_dict=False)[0]
        context = self.conditioner(y, x.shape[0], x.device).to(x.dtype)
        return self.unet(x, timestep, encoder_hidden_states=context, class_labels=labels,
                         return_dict=False)[0]
