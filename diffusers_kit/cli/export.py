"""``dkit export RUN_DIR --format diffusers OUT``: a run's model as a diffusers pipeline folder.

Exported: a run whose network is ``diffusers_unet`` (imported with ``dkit import``, or named in
a spec and perhaps fine-tuned) and whose process is a ``ddpm`` chain (``ddpm`` or
``diffusers_scheduler``). ``OUT`` becomes what ``DDPMPipeline.save_pretrained`` writes:
``model_index.json``, ``unet/`` (the run's sampling weights, its EMA where it has one, as
safetensors) and ``scheduler/scheduler_config.json`` (a ``DDPMScheduler`` carrying the process's
chain exactly and the network's prediction: :func:`~diffusers_kit.processes.
diffusers_scheduler.scheduler_config`). ``DDPMPipeline`` and ``DDIMPipeline`` load it.

Refused (exit status 2, with the reason): another network (dkit's own ``unet`` included, see
:data:`UNET_REASON`), another process, a latent run, learned variances, a class-conditional
U-Net, a ``dkit`` prediction diffusers has no name for, an ``OUT`` that is a file or a folder
that holds anything. Nothing is written outside ``OUT``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape

from diffusers_kit.console import make_console
from diffusers_kit.networks.diffusers_unet import MISSING, PREDICTION_TYPES, DiffusersUNet
from diffusers_kit.networks.unet import UNet
from diffusers_kit.processes.ddpm import DDPM
from diffusers_kit.processes.diffusers_scheduler import scheduler_config
from diffusers_kit.run.build import open_run
from diffusers_kit.spec.errors import SpecError, SpecIssue

FORMATS = ("diffusers",)

#: why dkit's own U-Net is not exported (docs/diffusers.md, "Export")
UNET_REASON = (
    "dkit's own U-Net (network kind 'unet', diffusers_kit/networks/unet.py) is not written as "
    "a UNet2DModel: it embeds the time as 1000 t, so at step i of a chain of T steps it sees "
    "1000 i / T, where diffusers' pipelines give a UNet2DModel the timestep i - 1 and its "
    "sinusoidal embedding has no scale or offset to make up the difference; and its attention "
    "heads are a count per block where UNet2DModel's are a width per head. Only "
    "diffusers_unet networks are exported")

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
    if isinstance(network, UNet):
        return UNET_REASON
    if not isinstance(network, DiffusersUNet):
        return (f"a run whose network is diffusers_unet (this one's is "
                f"{type(network).__name__}, which has no diffusers counterpart)")
    if not isinstance(process, DDPM):
        return (f"a run whose process is a discrete DDPM chain (ddpm or diffusers_scheduler), "
                f"the chain of diffusers' DDPM-family schedulers; this one's is "
                f"{type(process).__name__}")
    if network.num_steps != process.num_steps:
        return (f"a U-Net whose T ({network.num_steps}) is the process's num_steps "
                f"({process.num_steps})")
    if network.learned_variance or network.prediction not in PREDICTION_NAMES:
        return (f"a U-Net predicting {' / '.join(PREDICTION_NAMES)} (this one predicts "
                f"{network.prediction}{' with learned variances' * network.learned_variance})")
    if network.num_classes is not None:
        return ("an unconditional U-Net (this one takes class labels, which DDPMPipeline and "
                "DDIMPipeline do not pass)")
    return None


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
        pipeline = DDPMPipeline(unet=network.unet, scheduler=DDPMScheduler(**config))
        pipeline.save_pretrained(out, safe_serialization=True)
    schedule = config.get("beta_schedule", "trained_betas")
    make_console().print(
        f"wrote [bold]{escape(str(out))}[/]: DDPMPipeline (UNet2DModel, DDPMScheduler with "
        f"T = {config['num_train_timesteps']}, {schedule}, {config['prediction_type']}); "
        "load it with diffusers' DDPMPipeline or DDIMPipeline.from_pretrained", soft_wrap=True)
    return 0
