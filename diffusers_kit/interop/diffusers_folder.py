"""Reading local diffusers folders: a pipeline saved with ``save_pretrained`` or one component.

A pipeline folder holds ``model_index.json`` (component name -> ``[library, class]``) and one
subfolder per component: ``unet/config.json`` with ``unet/diffusion_pytorch_model.safetensors``,
``scheduler/scheduler_config.json``, ... A component folder is one of those subfolders on its
own. Everything here reads JSON only (diffusers is imported by :func:`load_model` alone, when a
model is built), and every failure is a ``ValueError`` naming the folder and what is wrong,
which the run graph reports as a spec error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

#: The ``path`` option of an imported component: a local folder or file (relative to the
#: working directory).
LocalPath = Annotated[str, Field(min_length=1, max_length=4096)]
#: The ``sha256`` option: the :func:`fingerprint` ``dkit import`` recorded (64 hex digits).
Fingerprint = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
#: The ``size`` option: how many bytes the fingerprinted files held.
ByteCount = Annotated[int, Field(ge=0, le=2**63 - 1)]


MODEL_INDEX = "model_index.json"
MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
SAFETENSORS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")

#: The defaults of diffusers' DDPM-family schedulers, for configs written by hand without them.
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                      "beta_schedule": "linear", "prediction_type": "epsilon"}


def read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; a ValueError naming the file when it is not one."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {file}: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return value


def listed_components(index: dict[str, Any]) -> dict[str, str]:
    """The components a ``model_index.json`` lists, name -> class name: its ``[library,
    class]`` entries. Entries written as ``[null, null]`` (a pipeline saved without an optional
    component, such as ``safety_checker=None``) are absent, and so are the pipeline's own
    options (``requires_safety_checker: false``), which are not lists."""
    out: dict[str, str] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or not value:
            continue
        if all(v is None for v in value):
            continue
        out[name] = str(value[-1])
    return out


def component_folder(path: str | os.PathLike[str], component: str, config_name: str,
                     user: str) -> Path:
    """The folder of ``component`` (``unet``, ``scheduler``) given either a pipeline folder
    (then its subfolder ``component``, which ``model_index.json`` must list), the component's
    own folder (holding ``config_name``), or the ``config_name`` file itself.

    ``user`` (the dkit component reading it) starts every error message.
    """
    given = Path(os.path.expanduser(os.fspath(path)))
    if given.is_file():
        if given.name == config_name:
            return given.parent
        raise ValueError(f"{user}: {str(path)!r} is a file; expected a diffusers pipeline "
                         f"folder or its {component}/ folder (with {config_name})")
    if not given.is_dir():
        raise ValueError(f"{user}: {str(path)!r} does not exist; expected a local diffusers "
                         f"pipeline folder (save_pretrained) or its {component}/ folder")
    if (given / config_name).is_file():
        return given
    index_file = given / MODEL_INDEX
    if not index_file.is_file():
        raise ValueError(f"{user}: {str(path)!r} is not a diffusers pipeline folder (no "
                         f"{MODEL_INDEX}) nor a {component} folder (no {config_name})")
    index = read_json(index_file)
    listed = sorted(listed_components(index))
    if component not in listed:
        raise ValueError(f"{user}: the diffusers pipeline in {str(path)!r} has no {component} "
                         f"(its {MODEL_INDEX} lists {', '.join(listed) or 'no components'})")
    folder = given / component
    if not (folder / config_name).is_file():
        raise ValueError(f"{user}: the diffusers pipeline in {str(path)!r} lists a {component} "
                         f"but {folder} has no {config_name}")
    return folder


def scheduler_near(unet_folder: Path) -> Path | None:
    """The ``scheduler_config.json`` of the pipeline a ``unet`` folder belongs to (its
    sibling ``scheduler/``), or None."""
    candidate = unet_folder.parent / "scheduler" / SCHEDULER_CONFIG
    return candidate if candidate.is_file() else None


def check_class(config: dict[str, Any], supported: tuple[str, ...], folder: Path, user: str
                ) -> str:
    """The config's ``_class_name``, which must be one of ``supported``."""
    name = config.get("_class_name")
    if name not in supported:
        raise ValueError(f"{user}: {folder} holds a {name or 'model of unnamed class'}, which "
                         f"is not supported; {user} reads {' / '.join(supported)}")
    return str(name)


def check_safetensors(folder: Path, user: str) -> None:
    """``folder`` must hold its weights as ``diffusion_pytorch_model.safetensors`` (or that
    file sharded, with its ``.index.json``): pickle files are never read (unpickling can run
    code)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if SAFETENSORS_WEIGHTS in names or f"{SAFETENSORS_WEIGHTS}.index.json" in names:
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    variants = [n for n in names if n.endswith(".safetensors")]
    if variants:
        raise ValueError(f"{user}: {folder} has no {SAFETENSORS_WEIGHTS}, only "
                         f"{', '.join(variants)} (weight variants are not read)")
    if pickles:
        raise ValueError(f"{user}: {folder} holds only pickle weights ({', '.join(pickles)}); "
                         "dkit reads safetensors only, since unpickling a file can run code. "
                         "Convert them once, where you trust the file, with diffusers: "
                         "UNet2DModel.from_pretrained(folder, use_safetensors=False)"
                         ".save_pretrained(folder)")
    raise ValueError(f"{user}: {folder} has no weights (no {SAFETENSORS_WEIGHTS})")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a component folder that :func:`check_safetensors` accepted: the
    single ``diffusion_pytorch_model.safetensors``, or the shard index and every shard it
    names."""
    single = folder / SAFETENSORS_WEIGHTS
    if single.is_file():
        return [single]
    index = folder / f"{SAFETENSORS_WEIGHTS}.index.json"
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map")
    return [index, *(folder / name for name in sorted(set(map(str, weight_map.values()))))]


def fingerprint(files: list[Path]) -> tuple[str, int]:
    """``(sha256, size)`` of ``files`` taken together, in order: the SHA-256 of each file's
    name, byte count and bytes, and the total byte count. What ``dkit import`` records of the
    folder it references, so that a later change of any of those files is detected."""
    digest = hashlib.sha256()
    total = 0
    for file in files:
        size = file.stat().st_size
        total += size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest(), total


def check_fingerprint(files: list[Path], sha256: str, size: int | None, user: str) -> None:
    """``files`` must be the ones recorded: their total size ``size`` (when given, checked
    first: no reading) and their :func:`fingerprint` ``sha256``; a ValueError saying what
    changed otherwise."""
    names = ", ".join(str(f) for f in files)
    advice = ("the run references these files and does not hold a copy of them: restore the "
              "files, or import the folder again with dkit import")
    try:
        found_size = sum(f.stat().st_size for f in files)
    except OSError as exc:
        raise ValueError(f"{user}: cannot read {names}: {exc}; {advice}") from exc
    if size is not None and found_size != size:
        raise ValueError(f"{user}: {names} changed since they were imported: {found_size} "
                         f"bytes, recorded {size}; {advice}")
    found, _ = fingerprint(files)
    if found != sha256.lower():
        raise ValueError(f"{user}: {names} changed since they were imported: SHA-256 "
                         f"{found[:16]}..., recorded {sha256[:16]}...; {advice}")


def read_scheduler_config(path: str | os.PathLike[str], sha256: str | None, user: str
                          ) -> tuple[Path, dict[str, Any]]:
    """The scheduler component's ``scheduler_config.json`` (its file and contents) under
    ``path`` (a pipeline or the component folder), its :func:`fingerprint` checked when
    ``sha256`` is given."""
    file = component_folder(path, "scheduler", SCHEDULER_CONFIG, user) / SCHEDULER_CONFIG
    if sha256 is not None:
        check_fingerprint([file], sha256, None, user)
    return file, read_json(file)


def load_model(folder: Path, kind: str, sha256: str | None, size: int | None, user: str,
               missing: str) -> Any:
    """The diffusers model class ``kind`` (``UNet2DModel``, ``AutoencoderKL``, ...) loaded from
    the component ``folder``: safetensors weights only, their :func:`fingerprint` checked when
    ``sha256`` is given (``size`` needs it), offline. ``missing``: the message when diffusers is
    not installed."""
    check_safetensors(folder, user)
    if sha256 is not None:
        check_fingerprint([folder / MODEL_CONFIG, *weight_files(folder)], sha256, size, user)
    elif size is not None:
        raise ValueError(f"{user}: size is set without sha256; set both (dkit import records "
                         "them) or neither")
    try:
        import diffusers
    except ImportError as exc:
        raise ValueError(missing) from exc
    try:
        return getattr(diffusers, kind).from_pretrained(
            folder, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers raises OSError, ValueError, RuntimeError ...
        raise ValueError(f"{user}: cannot load the {kind} in {folder}: "
                         f"{type(exc).__name__}: {exc}") from exc


def forgive_referenced(module: Any, prefix: str, incompatible: Any) -> None:
    """A ``load_state_dict`` post hook's work for a component whose weights come from a
    verified file (``sha256`` set): a state dict holding none of ``module``'s tensors (the
    checkpoint of an imported run, under any parent prefix ending in ``prefix``) leaves the
    file's weights, so they are not missing. A state dict holding some but not all of them is
    still refused (torch lists the rest)."""
    own = set(module.state_dict())
    groups: dict[str, list[str]] = {}
    for key in incompatible.missing_keys:
        head, found, tail = key.rpartition(prefix)
        if found and tail in own:
            groups.setdefault(head, []).append(key)
    drop = {k for keys in groups.values() if len(keys) == len(own) for k in keys}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in drop]
