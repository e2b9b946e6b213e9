"""``dkit import DIR``: a local diffusers pipeline folder becomes a dkit run folder.

The pipeline (``model_index.json`` naming a ``UNet2DModel`` ``unet`` and a DDPM-family or
flow-matching ``scheduler``, saved with ``save_pretrained``) is not copied: the run's
``spec.yaml`` names the folder (its absolute path) through the ``diffusers_unet`` network and the
``diffusers_scheduler`` process (``diffusers_flow`` for a flow-matching scheduler), with the
:func:`~diffusers_kit.interop.diffusers_folder.fingerprint` (SHA-256 and size) of the files
each reads, so that a later change of them is refused when the run is used.

A latent pipeline (a ``vae`` ``AutoencoderKL`` or a ``vqvae`` ``VQModel`` beside the U-Net)
gets a second, nested run folder, ``RUN_DIR/autoencoder``: a finished autoencoder run of the
``diffusers_vae`` first stage (referenced the same way), which the run's ``latent`` names. A
``UNet2DConditionModel`` (Stable Diffusion's layout) needs the pipeline's ``text_encoder`` and
``tokenizer``: its network gets a ``diffusers_text`` conditioner with the ``--prompt`` texts (one
label each) and ``--negative-prompt`` as the null label, and the run samples with
classifier-free guidance (``--guidance-scale``). ``safety_checker``, ``feature_extractor`` and
``image_encoder`` are not part of the model and are left out.

The run's ``checkpoint.safetensors`` holds none of the U-Net's weights (``DiffusersUNet`` with
``sha256`` takes them from the verified file). The run folder is otherwise a finished dkit run
(``run.json`` says ``imported``), which ``dkit sample``, ``dkit restore``, ``dkit evaluate``,
``dkit likelihood`` and model references accept.

A folder that is not a pipeline, a missing component, an unsupported class or pickle weights
are exit status 2, saying which.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffusers_kit.autoencoders.diffusers_vae import VAE_CLASSES
from diffusers_kit.checkpoint import save_checkpoint
from diffusers_kit.conditioners.diffusers_text import check_text_folder, text_files
from diffusers_kit.console import make_console
from diffusers_kit.interop.diffusers_folder import (
    MODEL_CONFIG,
    MODEL_INDEX,
    SCHEDULER_CONFIG,
    SCHEDULER_DEFAULTS,
    check_class,
    check_safetensors,
    fingerprint,
    listed_components,
    read_json,
    weight_files,
)
from diffusers_kit.networks.diffusers_unet import CONDITIONAL, PREDICTION_TYPES, UNET_CLASSES
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
from diffusers_kit.spec.errors import SpecError, command_line_error
from diffusers_kit.spec.loader import component_option, parse_yaml
from diffusers_kit.spec.references import spec_hash
from diffusers_kit.spec.validate import validate

#: what DIR must be
PIPELINE = ("a local diffusers pipeline folder written by save_pretrained (model_index.json, "
            "unet/ holding a UNet2DModel or UNet2DConditionModel with "
            "diffusion_pytorch_model.safetensors, scheduler/ holding a DDPM-family or "
            "flow-matching scheduler; "
            "for a latent pipeline vae/ or vqvae/, for a text one text_encoder/ and tokenizer/)")
#: the pipeline components dkit reads, and the classes it reads them as
COMPONENTS = {"unet": UNET_CLASSES, "scheduler": (*SCHEDULERS, *FLOW_SCHEDULERS)}
#: a latent pipeline's first stage, by the names pipelines give it
VAE_NAMES = ("vae", "vqvae")
#: a UNet2DConditionModel's text components
TEXT_NAMES = ("text_encoder", "tokenizer")
#: components that act on the output images or pass inputs dkit does not use: left out
IGNORED = ("safety_checker", "feature_extractor", "image_encoder")
#: pipelines that decode their latents unscaled (diffusers' unconditional LDMPipeline)
UNSCALED = ("LDMPipeline",)
#: the guidance scale of an imported text pipeline's sample section (diffusers' default)
GUIDANCE_SCALE = 7.5
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
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a text-to-image pipeline's prompt, label 0, 1, ... in order "
                             "(repeat it; needed for a UNet2DConditionModel)")
    parser.add_argument("--negative-prompt", default="", metavar="TEXT",
                        help="the null label's prompt, which classifier-free guidance steers "
                             "away from (default: the empty prompt)")
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE, metavar="W",
                        help=f"the sample section's classifier-free guidance scale for a text "
                             f"pipeline (default {GUIDANCE_SCALE}, as diffusers')")
    parser.add_argument("--device", default="auto",
                        help="the run's device: auto (default), cpu, cuda, cuda:N or mps")
    parser.set_defaults(func=import_command)


def _refuse(problem: str, given: str | None, option: str = "DIR") -> SpecError:
    expected = f"{PIPELINE}: {problem}" if option == "DIR" else problem
    return command_line_error(option, expected, given)


@dataclass
class Pipeline:
    """A pipeline folder as :func:`read_pipeline` found it: the U-Net's and the scheduler's
    configs, the first stage's component name and config (a latent pipeline), whether the
    U-Net attends to text, and the pipeline's class."""

    folder: Path
    unet: dict[str, Any]
    scheduler: dict[str, Any]
    vae_name: str | None = None
    vae: dict[str, Any] | None = None
    text: bool = False
    kind: str = ""


def read_pipeline(text: str) -> Pipeline:
    """The pipeline folder (absolute) and its configs, checked: a supported ``unet`` and
    ``scheduler`` (classes named when not), a supported ``vae`` / ``vqvae`` where there is one,
    ``text_encoder`` and ``tokenizer`` for a ``UNet2DConditionModel``, nothing else dkit would
    have to ignore silently, safetensors weights. Any problem is a spec error on ``DIR``."""
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
    listed = listed_components(index)
    vae_name = next((name for name in VAE_NAMES if name in listed), None)
    unet_file = folder / "unet" / MODEL_CONFIG
    text_model = listed.get("unet") == CONDITIONAL or (
        unet_file.is_file() and _class_of(unet_file) == CONDITIONAL)
    known = {*COMPONENTS, *IGNORED, *([vae_name] if vae_name else []),
             *(TEXT_NAMES if text_model else ())}
    others = {k: v for k, v in listed.items() if k not in known}
    if others:
        names = ", ".join(f"{k} ({v})" for k, v in sorted(others.items()))
        raise _refuse(f"its {index.get('_class_name', 'pipeline')} has components dkit does not "
                      f"import: {names} (dkit imports a unet and a scheduler, a vae or vqvae "
                      "beside them, and a UNet2DConditionModel's text_encoder and tokenizer)",
                      text)
    configs: dict[str, dict[str, Any]] = {}
    wanted = {**COMPONENTS, **({vae_name: VAE_CLASSES} if vae_name else {})}
    for name in (*wanted, *(TEXT_NAMES if text_model else ())):
        if name not in listed:
            raise _refuse(f"its {MODEL_INDEX} lists no {name} (it lists "
                          f"{', '.join(sorted(listed)) or 'nothing'})", text)
    for name, classes in wanted.items():
        file = folder / name / (SCHEDULER_CONFIG if name == "scheduler" else MODEL_CONFIG)
        if not file.is_file():
            raise _refuse(f"the {name} component is missing: {MODEL_INDEX} lists it but "
                          f"{file} does not exist", text)
        try:
            configs[name] = read_json(file)
            check_class(configs[name], classes, file.parent, f"its {name}")
            if name == "scheduler" and is_flow_config(configs[name]):
                flow_settings(configs[name], str(file))
            elif name == "scheduler":
                scheduler_betas(configs[name], str(file))
            else:
                check_safetensors(file.parent, f"its {name}")
        except ValueError as exc:
            raise _refuse(str(exc), text) from None
    if text_model:
        try:
            check_text_folder(folder, "its text components")
        except ValueError as exc:
            raise _refuse(str(exc), text) from None
    return Pipeline(folder, configs["unet"], configs["scheduler"], vae_name,
                    configs.get(vae_name) if vae_name else None, text_model,
                    str(index.get("_class_name", "")))


def _class_of(file: Path) -> str | None:
    """The ``_class_name`` of a config file, or None when it cannot be read (reported where
    the file is read for good)."""
    try:
        return read_json(file).get("_class_name")
    except ValueError:
        return None


def vae_spec(pipeline: Pipeline, name: str, data: dict[str, Any], device: str, root: Path
             ) -> dict[str, Any]:
    """The spec of a latent pipeline's first stage: ``diffusers_vae`` naming the folder with
    the fingerprint of the files it reads; nothing trained."""
    assert pipeline.vae_name is not None
    component = pipeline.folder / pipeline.vae_name
    sha, size = fingerprint([component / MODEL_CONFIG, *weight_files(component)])
    autoencoder: dict[str, Any] = {"kind": "diffusers_vae", "path": str(pipeline.folder),
                                   "sha256": sha, "size": size}
    if pipeline.kind in UNSCALED:
        autoencoder["scale"] = 1.0
    return {"name": f"{name}_autoencoder", "seed": 0, "device": device, "data": data,
            "autoencoder": autoencoder, "train": {"steps": 0, "ema_decay": 0.0},
            "output": {"root": str(root)}}


def import_spec(pipeline: Pipeline, name: str, data: dict[str, Any], device: str, root: Path,
                latent: Path | None = None, prompts: list[str] | None = None,
                negative_prompt: str = "", guidance_scale: float = GUIDANCE_SCALE
                ) -> dict[str, Any]:
    """The spec of an imported pipeline: its process and network name the folder with the
    fingerprints of the files they read; nothing is trained (no EMA either). ``latent``: the
    first stage's run folder; ``prompts``: a text pipeline's labels. A flow-matching
    scheduler gives the ``diffusers_flow`` process, the ``velocity`` prediction, the
    flow-matching objective and Euler on the process's (diffusers') grid as the sampler."""
    folder, scheduler = pipeline.folder, pipeline.scheduler
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
    if not flow and setting.get("clip_sample") and latent is None:  # DDPM/DDIM clip x0
        solver["clip_x0"] = float(setting.get("clip_sample_range", 1.0))
    network: dict[str, Any] = {"kind": "diffusers_unet", "path": str(folder),
                               "prediction": "velocity" if flow else PREDICTION_TYPES[kind],
                               "num_train_timesteps": setting["num_train_timesteps"],
                               "sha256": unet_sha, "size": unet_size}
    sample: dict[str, Any] = {"n": 16, "solver": solver}
    if pipeline.text:
        text_sha, _ = fingerprint(text_files(folder))
        network["conditioner"] = {"kind": "diffusers_text", "path": str(folder),
                                  "prompts": list(prompts or []),
                                  "negative_prompt": negative_prompt, "sha256": text_sha}
        sample["labels"] = "all"
        sample["guidance"] = [{"kind": "classifier_free", "scale": guidance_scale}]
    spec: dict[str, Any] = {"name": name, "seed": 0, "device": device, "data": data}
    if latent is not None:
        spec["latent"] = str(latent)
    return {**spec,
            "process": {"kind": "diffusers_flow" if flow else "diffusers_scheduler",
                        "path": str(folder),
                        "sha256": scheduler_sha},
            "network": network,
            "objective": {"kind": "flow_matching" if flow else "ddpm_simple"},
            "train": {"steps": 0, "ema_decay": 0.0},
            "sample": sample,
            "output": {"root": str(root)}}


def default_data(pipeline: Pipeline, option: str | None) -> dict[str, Any]:
    """``--data`` parsed, or the digits when the model's images are 1-channel with sides 8,
    16 or 32 that its first stage and U-Net can take (pixel space: the 8 x 8 originals)."""
    if option is not None:
        return component_option("--data", option, "a data set as a YAML mapping, e.g. "
                                "'{kind: image_folder, path: imgs, size: 32, channels: 3}'")
    unet = pipeline.unet
    factor = 2 ** (len(unet.get("block_out_channels", ())) - 1)
    if pipeline.vae is None:
        channels, what = int(unet.get("in_channels", 3)), "U-Net"
        if channels == 1 and 8 % factor == 0:
            return dict(DIGITS)
        side = unet.get("sample_size", 32)
    else:
        channels, what = int(pipeline.vae.get("in_channels", 3)), pipeline.vae_name
        factor *= 2 ** (len(pipeline.vae.get("block_out_channels", (64,))) - 1)
        side = unet.get("sample_size") if isinstance(unet.get("sample_size"), int) else 0
        side = side * 2 ** (len(pipeline.vae.get("block_out_channels", (64,))) - 1)
        if channels == 1 and side in (8, 16, 32) and side % factor == 0:
            return {**DIGITS, "size": side}
    raise _refuse(f"a data set of the {what}'s {channels}-channel images with sides divisible "
                  f"by {factor}, e.g. --data '{{kind: image_folder, path: imgs, size: "
                  f"{side or 32}, channels: {channels}}}' (dkit samples, restores and evaluates "
                  "in that data set's space; the digits are 1 x 8 x 8, 16 x 16 or 32 x 32)",
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
    pipeline = read_pipeline(args.folder)
    folder = pipeline.folder
    name = args.name or folder.name
    prompts = list(args.prompt or [])
    if pipeline.text and not prompts:
        raise _refuse("at least one --prompt for a text-to-image pipeline (its "
                      "UNet2DConditionModel attends to text): label 0, 1, ... are the prompts "
                      "in order", None, "--prompt")
    if prompts and not pipeline.text:
        raise _refuse("no --prompt: this pipeline's U-Net does not attend to text",
                      prompts[0], "--prompt")
    data = default_data(pipeline, args.data)
    root = Path(args.out).expanduser().resolve().parent if args.out else Path("runs")
    registry = get_registry()
    vae_data = None
    if pipeline.vae is not None:  # checked before anything is written
        vae_data = vae_spec(pipeline, name, data, args.device, root)
        vae_document = parse_yaml(yaml.safe_dump(vae_data, sort_keys=False), "dkit import")
        vae_components = build_components(validate(vae_document, registry), vae_document,
                                          registry, stages={"train"})
    run_dir = target_folder(args.out, root, name)
    try:
        latent = None
        if vae_data is not None:
            latent = (run_dir / "autoencoder").resolve()
            latent.mkdir()
            write_run(latent, vae_data, vae_components, registry, folder,
                      {"vae": vae_data["autoencoder"]["sha256"],
                       "vae_bytes": vae_data["autoencoder"]["size"]})
        spec_data = import_spec(pipeline, name, data, args.device, root, latent, prompts,
                                args.negative_prompt, args.guidance_scale)
        document = parse_yaml(yaml.safe_dump(spec_data, sort_keys=False), "dkit import")
        components = build_components(validate(document, registry), document, registry,
                                      stages={"train"})
        network = spec_data["network"]
        write_run(run_dir, spec_data, components, registry, folder,
                  {"unet": network["sha256"], "unet_bytes": network["size"],
                   "scheduler": spec_data["process"]["sha256"],
                   **({"text": network["conditioner"]["sha256"]} if pipeline.text else {})})
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # created here: absent or empty before
        raise
    if args.out is None:
        point_latest(run_dir)
    network = components.diffusion.network
    extra = ""
    if latent is not None:
        autoencoder = components.diffusion.autoencoder
        extra += (f", in the latent space of its {pipeline.vae_name} (latents "
                  f"{tuple(autoencoder.latent_shape)} scaled by {float(autoencoder.scale):g})")
    if pipeline.text:
        extra += (f", {len(prompts)} prompt(s) as labels 0..{len(prompts) - 1}, guided with "
                  f"scale {args.guidance_scale:g} away from the "
                  f"{'negative' if args.negative_prompt else 'empty'} prompt")
    make_console().print(
        f"imported {folder} ({network.parameter_count():,} parameters, "
        f"{spec_data['network']['prediction']} prediction, T = {network.num_steps}{extra}) as "
        f"[bold]{run_dir}[/]: its spec references the folder's files (SHA-256 recorded), its "
        "checkpoint holds no copy of the weights", soft_wrap=True)
    return 0


def write_run(run_dir: Path, spec_data: dict[str, Any], components: Any, registry: Any,
              source: Path, fingerprints: dict[str, Any]) -> None:
    """Write an imported run's ``spec.yaml``, its empty checkpoint and its ``run.json``
    (finished, ``imported`` naming the source and the fingerprints)."""
    document = parse_yaml(yaml.safe_dump(spec_data, sort_keys=False), "dkit import")
    spec = validate(document, registry)
    write_spec(run_dir, components.resolved)
    save_checkpoint(run_dir / CHECKPOINT, {}, {"step": 0, "spec": spec_data["name"],
                                               "imported": str(source)})
    stamp = now()
    write_record(run_dir, {
        "name": spec_data["name"], "status": "finished",
        "train_hash": spec_hash(spec, components.resolved),
        "started": stamp, "finished": stamp, "train_finished": None, "trained": False,
        "step": 0, "checkpoint_from": None, "dependency": False, "stages": [],
        "dependencies": [], "imported": {"source": str(source), **fingerprints}})
