"""``dkit import DIR``: a local diffusers pipeline folder becomes a dkit run folder.

The pipeline (``model_index.json`` naming a ``UNet2DModel`` ``unet`` and a DDPM-family or
flow-matching ``scheduler``, saved with ``save_pretrained``) is not copied: the run's
``spec.yaml`` names the folder (its absolute path) through the ``diffusers_unet`` network and
the ``diffusers_scheduler`` process (``diffusers_flow`` for a flow-matching scheduler), with the
:func:`~diffusers_kit.interop.diffusers_folder.fingerprint` (SHA-256 and size) of the files each
reads, so that a later change of them is refused when the run is used. The run's
``checkpoint.safetensors`` holds none of the U-Net's weights (``DiffusersUNet`` with ``sha256``
takes them from the verified file). The run folder is otherwise a finished dkit run
(``run.json`` says ``imported``), which ``dkit sample``, ``dkit restore``, ``dkit evaluate``,
``dkit likelihood`` and model references accept.

A folder that is not a pipeline, a missing component, an unsupported class or pickle weights
are exit status 2, saying which.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from diffusers_kit.checkpoint import save_checkpoint
from diffusers_kit.console import make_console
from diffusers_kit.interop.diffusers_folder import (
    MODEL_CONFIG,
    MODEL_INDEX,
    SCHEDULER_CONFIG,
    SCHEDULER_DEFAULTS,
    check_class,
    check_safetensors,
    fingerprint,
    read_json,
    weight_files,
)
from diffusers_kit.networks.diffusers_unet import PREDICTION_TYPES
from diffusers_kit.outputs import make_run_dir
from diffusers_kit.processes.diffusers_flow import FLOW_SCHEDULERS, flow_settings, is_flow_config
from diffusers_kit.processes.diffusers_scheduler import SCHEDULERS, scheduler_betas
from diffusers_kit.registry import get_registry
from diffusers_kit.run.build import build_components
from diffusers_kit.run_folder import (
    CHECKPOINT,
    now,
    point_latest,
    write_record,
    write_spec,
)
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import component_option, parse_yaml
from diffusers_kit.spec.references import spec_hash
from diffusers_kit.spec.validate import validate

#: what DIR must be
PIPELINE = ("a local diffusers pipeline folder written by save_pretrained (model_index.json, "
            "unet/ holding a UNet2DModel with diffusion_pytorch_model.safetensors, scheduler/ "
            "holding a DDPM-family or flow-matching scheduler)")
#: the pipeline components dkit reads
COMPONENTS = {"unet": ("UNet2DModel",), "scheduler": (*SCHEDULERS, *FLOW_SCHEDULERS)}
#: the data set of a 1 x 8 x 8 U-Net when --data is not given
DIGITS = {"kind": "digits", "scale": "symmetric"}
#: the solver of the run's sample section (dkit sample's default)
SAMPLE_STEPS = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import", help="make a run folder of a local diffusers pipeline (its weights "
        "referenced, not copied)")
    parser.add_argument("folder", metavar="DIR", help="the pipeline folder (save_pretrained)")
    parser.add_argument("--out", metavar="RUN_DIR",
                        help="the run folder to write (absent or empty); default "
                             "runs/NAME/<time>, with runs/NAME/latest pointing to it")
    parser.add_argument("--name", help="the run's name (default: the folder's name)")
    parser.add_argument("--data", metavar="YAML",
                        help="the data set of the U-Net's images, a YAML mapping such as "
                             "'{kind: image_folder, path: imgs, size: 32, channels: 3}' (for the "
                             "display space, dkit restore and dkit evaluate); default digits "
                             "for a 1-channel U-Net whose sides divide 8")
    parser.add_argument("--device", default="auto",
                        help="the run's device: auto (default), cpu, cuda, cuda:N or mps")
    parser.set_defaults(func=import_command)


def _refuse(problem: str, given: str | None, option: str = "DIR") -> SpecError:
    expected = f"{PIPELINE}: {problem}" if option == "DIR" else problem
    return SpecError([SpecIssue((option,), expected, given, None, "command line")])


def read_pipeline(text: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The pipeline folder (absolute), its U-Net config and its scheduler config, checked:
    a pipeline with exactly a supported ``unet`` and ``scheduler`` (classes named when not),
    safetensors weights. Any problem is a spec error on ``DIR``."""
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise _refuse("this is not a folder" if folder.exists() else "it does not exist", text)
    if not (folder / MODEL_INDEX).is_file():
        what = ("a component folder (import the pipeline folder above it)"
                if (folder / MODEL_CONFIG).is_file() or (folder / SCHEDULER_CONFIG).is_file()
                else "not a pipeline")
        raise _refuse(f"it has no {MODEL_INDEX}: {what}", text)
    try:
        index = read_json(folder / MODEL_INDEX)
    except ValueError as exc:
        raise _refuse(str(exc), text) from None
    listed = {k: v for k, v in index.items() if not k.startswith("_") and v is not None}
    others = {k: v for k, v in listed.items() if k not in COMPONENTS}
    if others:
        names = ", ".join(f"{k} ({v[-1] if isinstance(v, list) and v else v})"
                          for k, v in sorted(others.items()))
        raise _refuse(f"its {index.get('_class_name', 'pipeline')} has components dkit does not "
                      f"import: {names} (only unet and scheduler pipelines such as "
                      "DDPMPipeline and DDIMPipeline)", text)
    configs: dict[str, dict[str, Any]] = {}
    for name, classes in COMPONENTS.items():
        if name not in listed:
            raise _refuse(f"its {MODEL_INDEX} lists no {name} (it lists "
                          f"{', '.join(sorted(listed)) or 'nothing'})", text)
        file = folder / name / (MODEL_CONFIG if name == "unet" else SCHEDULER_CONFIG)
        if not file.is_file():
            raise _refuse(f"the {name} component is missing: {MODEL_INDEX} lists it but "
                          f"{file} does not exist", text)
        try:
            configs[name] = read_json(file)
            check_class(configs[name], classes, file.parent, f"its {name}")
            if name == "unet":
                check_safetensors(file.parent, "its unet")
            elif is_flow_config(configs[name]):
                flow_settings(configs[name], str(file))
            else:
                scheduler_betas(configs[name], str(file))
        except ValueError as exc:
            raise _refuse(str(exc), text) from None
    return folder, configs["unet"], configs["scheduler"]


def import_spec(folder: Path, unet: dict[str, Any], scheduler: dict[str, Any], name: str,
                data: dict[str, Any], device: str, root: Path) -> dict[str, Any]:
    """The spec of an imported pipeline: its process and network name the folder with the
    fingerprints of the files they read; nothing is trained (no EMA either). A flow-matching
    scheduler gives the ``diffusers_flow`` process, the ``velocity`` prediction, the
    flow-matching objective and Euler on the process's (diffusers') grid as the sampler."""
    flow = is_flow_config(scheduler)
    setting = {**SCHEDULER_DEFAULTS, **{k: v for k, v in scheduler.items() if v is not None}}
    kind = setting["prediction_type"]
    if not flow and kind not in PREDICTION_TYPES:
        raise _refuse(f"the scheduler's prediction_type {kind!r} is not one of "
                      f"{', '.join(PREDICTION_TYPES)}", str(folder))
    unet_sha, unet_size = fingerprint([folder / "unet" / MODEL_CONFIG,
                                       *weight_files(folder / "unet")])
    scheduler_sha, _ = fingerprint([folder / "scheduler" / SCHEDULER_CONFIG])
    solver: dict[str, Any] = {"kind": "euler" if flow else "ddim",
                              "steps": min(SAMPLE_STEPS, setting["num_train_timesteps"])}
    if not flow and setting.get("clip_sample"):  # DDPM/DDIM schedulers clip x0 by default
        solver["clip_x0"] = float(setting.get("clip_sample_range", 1.0))
    return {
        "name": name, "seed": 0, "device": device, "data": data,
        "process": {"kind": "diffusers_flow" if flow else "diffusers_scheduler",
                    "path": str(folder), "sha256": scheduler_sha},
        "network": {"kind": "diffusers_unet", "path": str(folder),
                    "prediction": "velocity" if flow else PREDICTION_TYPES[kind],
                    "num_train_timesteps": setting["num_train_timesteps"],
                    "sha256": unet_sha, "size": unet_size},
        "objective": {"kind": "flow_matching" if flow else "ddpm_simple"},
        "train": {"steps": 0, "ema_decay": 0.0},
        "sample": {"n": 16, "solver": solver},
        "output": {"root": str(root)},
    }


def default_data(unet: dict[str, Any], option: str | None) -> dict[str, Any]:
    """``--data`` parsed, or the digits (1 x 8 x 8) when the U-Net takes such images."""
    if option is not None:
        return component_option("--data", option, "a data set as a YAML mapping, e.g. "
                                "'{kind: image_folder, path: imgs, size: 32, channels: 3}'")
    channels = int(unet.get("in_channels", 3))
    factor = 2 ** (len(unet.get("block_out_channels", ())) - 1)
    if channels == 1 and 8 % factor == 0:
        return dict(DIGITS)
    raise _refuse(f"a data set of the U-Net's {channels}-channel images with sides divisible "
                  f"by {factor}, e.g. --data '{{kind: image_folder, path: imgs, size: "
                  f"{unet.get('sample_size', 32)}, channels: {channels}}}' (dkit samples, "
                  "restores and evaluates in that data set's space; the digits are 1 x 8 x 8)",
                  None, "--data")


def target_folder(out: str | None, root: Path, name: str) -> Path:
    """``--out`` (created; refused when it holds anything), or a new ``runs/NAME/<time>``."""
    if out is None:
        return make_run_dir(root, name)
    folder = Path(out).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise _refuse("a run folder that does not exist yet, or an empty folder", out, "--out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def import_command(args: argparse.Namespace) -> int:
    folder, unet, scheduler = read_pipeline(args.folder)
    name = args.name or folder.name
    data = default_data(unet, args.data)
    root = Path(args.out).expanduser().resolve().parent if args.out else Path("runs")
    spec_data = import_spec(folder, unet, scheduler, name, data, args.device, root)
    document = parse_yaml(yaml.safe_dump(spec_data, sort_keys=False), "dkit import")
    registry = get_registry()
    spec = validate(document, registry)
    components = build_components(spec, document, registry, stages={"train"})
    run_dir = target_folder(args.out, root, name)
    write_spec(run_dir, components.resolved)
    save_checkpoint(run_dir / CHECKPOINT, {}, {"step": 0, "spec": name,
                                               "imported": str(folder)})
    stamp = now()
    write_record(run_dir, {
        "name": name, "status": "finished", "train_hash": spec_hash(spec, components.resolved),
        "started": stamp, "finished": stamp, "train_finished": None, "trained": False,
        "step": 0, "checkpoint_from": None, "dependency": False, "stages": [],
        "dependencies": [],
        "imported": {"source": str(folder), "unet": spec_data["network"]["sha256"],
                     "unet_bytes": spec_data["network"]["size"],
                     "scheduler": spec_data["process"]["sha256"]}})
    if args.out is None:
        point_latest(run_dir)
    network = components.diffusion.network
    make_console().print(
        f"imported {folder} ({network.parameter_count():,} parameters, "
        f"{spec_data['network']['prediction']} prediction, T = {network.num_steps}) as "
        f"[bold]{run_dir}[/]: its spec references the folder's files (SHA-256 recorded), its "
        "checkpoint holds no copy of the weights", soft_wrap=True)
    return 0
