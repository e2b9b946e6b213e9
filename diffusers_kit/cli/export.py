"""``dkit export RUN_DIR --format diffusers OUT``: a run's model as a diffusers pipeline folder.

Exported: a run whose process is a ``ddpm`` chain (``ddpm`` or ``diffusers_scheduler``) and
whose network is ``diffusers_unet`` (imported with ``dkit import``, or named in a spec and
perhaps fine-tuned) or dkit's own ``unet`` on a chain of T = 1000 steps (mapped onto
``UNet2DModel`` by :mod:`diffusers_kit.interop.unet2d`, which says why only T = 1000). ``OUT``
becomes what ``DDPMPipeline.save_pretrained`` writes: ``model_index.json``, ``unet/`` (the run's
sampling weights, its EMA where it has one, as safetensors) and
``scheduler/scheduler_config.json`` (a ``DDPMScheduler`` carrying the process's chain exactly
and the network's prediction: :func:`~diffusers_kit.processes.diffusers_scheduler.
scheduler_config`). ``DDPMPipeline`` and ``DDIMPipeline`` load it.

A latent run maps where its parts are diffusers' own: a ``diffusers_vae`` first stage and a
``diffusers_unet``. With a ``UNet2DConditionModel`` and its ``diffusers_text`` conditioner it
becomes a ``StableDiffusionPipeline`` folder (``vae/`` with the run's latent scale as
``scaling_factor``, ``text_encoder/`` and ``tokenizer/`` as the source pipeline has them,
``unet/``, ``scheduler/``; no safety checker); with a ``UNet2DModel`` and a latent scale of 1 an
``LDMPipeline`` folder (``vqvae/``, which that pipeline decodes unscaled).

Refused (exit status 2, with the reason): another network, a ``unet`` that does not map
(:func:`~diffusers_kit.interop.unet2d.unet2d_refusal`), another process, a latent run whose
first stage or conditioner has no diffusers counterpart (dkit's own ``kl`` / ``vq``, ``hf_text``,
``class_tokens``), an unconditional latent run with a scaled latent, learned variances, a
class-conditional U-Net, a prediction diffusers has no name for, an ``OUT`` that is a file or a
folder that holds anything. Nothing is written outside ``OUT``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape

from diffusers_kit.autoencoders.diffusers_vae import DiffusersVAE
from diffusers_kit.conditioners.diffusers_text import DiffusersText
from diffusers_kit.console import make_console
from diffusers_kit.interop.unet2d import unet2d_config, unet2d_refusal, unet2d_state
from diffusers_kit.networks.diffusers_unet import MISSING, PREDICTION_TYPES, DiffusersUNet
from diffusers_kit.networks.unet import UNet
from diffusers_kit.processes.ddpm import DDPM
from diffusers_kit.processes.diffusers_scheduler import scheduler_config
from diffusers_kit.run.build import open_run
from diffusers_kit.spec.errors import command_line_error

FORMATS = ("diffusers",)

#: dkit's prediction -> diffusers' prediction_type
PREDICTION_NAMES = {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write a run's model for another library "
                                   "(--format diffusers: a DDPMPipeline folder)")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="diffusers: a pipeline folder that DDPMPipeline / DDIMPipeline "
                             ".from_pretrained load")
    parser.add_argument("out", metavar="OUT", help="the folder to write (absent or empty)")
    parser.set_defaults(func=export_command)


def latent_refusal(network: Any, autoencoder: Any) -> str | None:
    """Why a latent run cannot be written as a ``StableDiffusionPipeline`` or ``LDMPipeline``
    folder (module doc), or None when it can."""
    if not isinstance(autoencoder, DiffusersVAE):
        return (f"a pixel-space run, or a latent run whose autoencoder is diffusers_vae (this "
                f"one's is {type(autoencoder).__name__}, dkit's own, whose blocks are not "
                "AutoencoderKL's or VQModel's: no diffusers pipeline can decode its latents)")
    if not isinstance(network, DiffusersUNet):
        return (f"a latent run whose network is diffusers_unet (this one's is "
                f"{type(network).__name__}, which has no diffusers counterpart in a latent "
                "pipeline)")
    conditioner = network.conditioner
    if conditioner is None and float(autoencoder.scale) != 1.0:
        return (f"an unconditional latent run with latent scale 1 (diffusers' LDMPipeline "
                f"decodes its latents unscaled; this run scales them by "
                f"{float(autoencoder.scale):g})")
    if conditioner is not None and not isinstance(conditioner, DiffusersText):
        return (f"a text-conditioned run whose conditioner is diffusers_text (this one's is "
                f"{type(conditioner).__name__}: StableDiffusionPipeline encodes prompts with "
                "its own CLIP text encoder)")
    if network.class_embeds is not None:
        return ("a U-Net without class embeddings (StableDiffusionPipeline passes no class "
                "labels)")
    return None


def check_exportable(process: Any, network: Any, autoencoder: Any = None) -> str | None:
    """Why a run's process and network (and first stage) cannot be written as a diffusers
    pipeline folder, or None when they can."""
    if autoencoder is not None and (reason := latent_refusal(network, autoencoder)):
        return reason
    if not isinstance(network, (DiffusersUNet, UNet)):
        return (f"a run whose network is diffusers_unet or unet (this one's is "
                f"{type(network).__name__}, which has no diffusers counterpart)")
    if not isinstance(process, DDPM):
        return (f"a run whose process is a discrete DDPM chain (ddpm or diffusers_scheduler), "
                f"the chain of diffusers' DDPM-family schedulers; this one's is "
                f"{type(process).__name__}")
    if isinstance(network, UNet) and (reason := unet2d_refusal(network, process.num_steps)):
        return reason
    if isinstance(network, DiffusersUNet) and network.num_steps != process.num_steps:
        return (f"a U-Net whose T ({network.num_steps}) is the process's num_steps "
                f"({process.num_steps})")
    if network.learned_variance or network.prediction not in PREDICTION_NAMES:
        return (f"a U-Net predicting {' / '.join(PREDICTION_NAMES)} (this one predicts "
                f"{network.prediction}{' with learned variances' * network.learned_variance})")
    if getattr(network, "conditioner", None) is not None and autoencoder is None:
        return ("a latent run for a text-conditioned U-Net (dkit writes text pipelines as "
                "StableDiffusionPipeline, which diffuses in a VAE's latent space)")
    if network.num_classes is not None and autoencoder is None:
        return ("an unconditional U-Net (this one takes class labels, which DDPMPipeline and "
                "DDIMPipeline do not pass)")
    return None


def unet2d_of(network: DiffusersUNet | UNet) -> Any:
    """The ``UNet2DModel`` of a run's network, with the weights it holds now: a
    ``diffusers_unet``'s own, or dkit's ``unet`` mapped by :mod:`diffusers_kit.interop.
    unet2d` (loaded strictly: every weight has its place)."""
    if isinstance(network, DiffusersUNet):
        return network.unet
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet2d_config(network))
    unet.load_state_dict(unet2d_state(network), strict=True)
    return unet


def check_out(text: str) -> Path:
    """``OUT``: absent, or an empty folder."""
    out = Path(text).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise command_line_error("OUT", "a folder that does not exist yet, or an empty one "
                                 "(dkit export never writes into a folder that holds "
                                 "anything)", text)
    return out


def export_command(args: argparse.Namespace) -> int:
    out = check_out(args.out)
    _, components = open_run(args.run_dir)
    diffusion = components.diffusion
    reason = check_exportable(diffusion.process, diffusion.network, diffusion.autoencoder)
    if reason is not None:
        raise command_line_error("RUN_DIR", reason, args.run_dir)
    try:
        from diffusers import DDPMPipeline, DDPMScheduler
    except ImportError:
        raise command_line_error("--format", MISSING.replace(
            "diffusers_unet", "dkit export --format diffusers"), args.format) from None
    network = diffusion.network
    config = scheduler_config(diffusion.process, PREDICTION_NAMES[network.prediction])
    out.mkdir(parents=True, exist_ok=True)
    with diffusion.sampling_weights():  # the EMA weights, where the run has them
        scheduler = DDPMScheduler(**config)
        if diffusion.autoencoder is None:
            pipeline, kind = DDPMPipeline(unet=unet2d_of(network), scheduler=scheduler), (
                "DDPMPipeline (UNet2DModel")
            loaders = "DDPMPipeline or DDIMPipeline"
        else:
            pipeline = latent_pipeline(network, diffusion.autoencoder, scheduler)
            kind = f"{type(pipeline).__name__} ({type(network.unet).__name__}"
            loaders = type(pipeline).__name__
        pipeline.save_pretrained(out, safe_serialization=True)
    schedule = config.get("beta_schedule", "trained_betas")
    make_console().print(
        f"wrote [bold]{escape(str(out))}[/]: {kind}, DDPMScheduler with "
        f"T = {config['num_train_timesteps']}, {schedule}, {config['prediction_type']}); "
        f"load it with diffusers' {loaders}.from_pretrained", soft_wrap=True)
    return 0


def latent_pipeline(network: DiffusersUNet, autoencoder: DiffusersVAE, scheduler: Any) -> Any:
    """A latent run's diffusers pipeline (module doc): ``StableDiffusionPipeline`` with the
    source pipeline's text encoder and tokenizer for a text-conditioned U-Net, ``LDMPipeline``
    otherwise. The first stage's ``scaling_factor`` is the run's latent scale."""
    import diffusers

    vae = autoencoder.vae
    vae.register_to_config(scaling_factor=float(autoencoder.scale))
    conditioner = network.conditioner
    if conditioner is None:
        return diffusers.LDMPipeline(vqvae=vae, unet=network.unet, scheduler=scheduler)
    import transformers

    source = Path(conditioner.path).expanduser()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source / "tokenizer",
                                                           local_files_only=True)
    encoder = transformers.CLIPTextModel.from_pretrained(
        source / "text_encoder", local_files_only=True, use_safetensors=True)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=network.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
