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

Refused (exit status 2, with the reason): another network, a ``unet`` that does not map
(:func:`~diffusers_kit.interop.unet2d.unet2d_refusal`), another process, a latent run, learned
variances, a class-conditional U-Net, a prediction diffusers has no name for, an ``OUT`` that
is a file or a folder that holds anything. Nothing is written outside ``OUT``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape

from diffusers_kit.console import make_console
from diffusers_kit.interop.unet2d import unet2d_config, unet2d_refusal, unet2d_state
from diffusers_kit.networks.diffusers_unet import MISSING, PREDICTION_TYPES, DiffusersUNet
from diffusers_kit.networks.unet import UNet
from diffusers_kit.processes.ddpm import DDPM
from diffusers_kit.processes.diffusers_scheduler import scheduler_config
from diffusers_kit.run.build import open_run
from diffusers_kit.spec.errors import SpecError, SpecIssue

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


def _refuse(field: str, expected: str, given: Any) -> SpecError:
    return SpecError([SpecIssue((field,), expected, given, None, "command line")])


def check_exportable(process: Any, network: Any, latent: bool) -> str | None:
    """Why a run's process and network cannot be written as a diffusers ``UNet2DModel`` +
    ``DDPMScheduler`` pipeline, or None when they can."""
    if latent:
        return "a pixel-space run (this one diffuses in an autoencoder's latent space)"
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
    if network.num_classes is not None:
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
        raise _refuse("OUT", "a folder that does not exist yet, or an empty one (dkit export "
                      "never writes into a folder that holds anything)", text)
    return out


def export_command(args: argparse.Namespace) -> int:
    out = check_out(args.out)
    _, components = open_run(args.run_dir)
    diffusion = components.diffusion
    reason = check_exportable(diffusion.process, diffusion.network,
                              diffusion.autoencoder is not None)
    if reason is not None:
        raise _refuse("RUN_DIR", reason, args.run_dir)
    try:
        from diffusers import DDPMPipeline, DDPMScheduler
    except ImportError:
        raise _refuse("--format", MISSING.replace("diffusers_unet", "dkit export --format "
                                                  "diffusers"), args.format) from None
    network = diffusion.network
    config = scheduler_config(diffusion.process, PREDICTION_NAMES[network.prediction])
    out.mkdir(parents=True, exist_ok=True)
    with diffusion.sampling_weights():  # the EMA weights, where the run has them
        pipeline = DDPMPipeline(unet=unet2d_of(network), scheduler=DDPMScheduler(**config))
        pipeline.save_pretrained(out, safe_serialization=True)
    schedule = config.get("beta_schedule", "trained_betas")
    make_console().print(
        f"wrote [bold]{escape(str(out))}[/]: DDPMPipeline (UNet2DModel, DDPMScheduler with "
        f"T = {config['num_train_timesteps']}, {schedule}, {config['prediction_type']}); "
        "load it with diffusers' DDPMPipeline or DDIMPipeline.from_pretrained", soft_wrap=True)
    return 0
