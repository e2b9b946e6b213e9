"""Taking weights from an earlier run: ``--from`` (any run's checkpoint), ``--resume`` (the same
spec, continued) and the reuse of a finished training (the checkpoint linked, not copied).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from diffusers_kit.checkpoint import CheckpointError, load_checkpoint, remove_orphans, unprefixed
from diffusers_kit.diffusion import (
    Diffusion,
)
from diffusers_kit.run_folder import (
    CHECKPOINT,
    METRICS,
    RUN_RECORD,
    SAMPLES,
    SPEC_FILE,
    newest_run,
    read_spec,
)
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.references import (
    TRAINING_SECTIONS,
)


def load_previous(diffusion: Diffusion, from_dir: Path, field: str = "--from",
                  resolved: dict[str, Any] | None = None, note: Console | None = None) -> int:
    """Load ``from_dir``'s checkpoint into ``diffusion``; a mismatch is a spec error naming
    ``field`` (the option or spec field that chose the folder), a corrupt file a
    :class:`~diffusers_kit.checkpoint.CheckpointError`. With ``resolved`` (this run's resolved
    spec) the training fields that differ from the checkpoint's run are printed on ``note``."""
    source = from_dir / CHECKPOINT
    if resolved is not None and note is not None:
        changed = previous_differences(from_dir, resolved)
        if changed:
            note.print(f"note: the checkpoint in {from_dir} was trained with a spec that differs "
                       f"in {', '.join(changed)}", soft_wrap=True, markup=False)
    try:
        diffusion.load(source)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        expected = f"a checkpoint whose weights fit this spec's network ({first})"
        issue = SpecIssue((field,), expected, str(source), None,
                          "command line" if field.startswith("-") else None)
        raise SpecError([issue]) from None
    return diffusion.step


# the spec fields a resumed run may change: how long, how often to log / save, what comes after
RESUMABLE_CHANGES = {("train", "steps"), ("train", "log_every"), ("train", "checkpoint_every")}


def _differences(old: Any, new: Any, path: tuple[str, ...] = ()) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            if (*path, key) not in RESUMABLE_CHANGES:
                found += _differences(old.get(key), new.get(key), (*path, key))
        return found
    return [] if old == new else [".".join(path)]


def previous_differences(run_dir: Path, resolved: dict[str, Any]) -> list[str]:
    """The training fields (seed, data, process, network, objective, train) in which
    ``resolved`` differs from the spec.yaml of ``run_dir`` ([] when that file is unreadable)."""
    try:
        previous = read_spec(run_dir)
    except (OSError, ValueError, yaml.YAMLError):
        return []
    if not isinstance(previous, dict):
        return []
    return [d for section in TRAINING_SECTIONS
            for d in _differences(previous.get(section), resolved.get(section), (section,))]


def _allowed(field: str, allow_change: tuple[str, ...]) -> bool:
    return any(field == a or field.startswith(a + ".") for a in allow_change)


# the files a resumed run writes in its folder
RUN_FILES = (SPEC_FILE, CHECKPOINT, RUN_RECORD, SAMPLES, METRICS, "run.log", "samples.png")

# what a resumable checkpoint must hold besides the weights (see Trainer.state)
TRAINING_META = ("train_step", "micro", "since", "optimizer", "log")
TRAINING_TENSORS = ("trainer.order", "trainer.running", "trainer.first_bad", "rng.data",
                    "rng.torch")


def check_resumable(resume_dir: Path, resolved: dict[str, Any], world: int = 1,
                    allow_change: tuple[str, ...] = (), diffusion: Diffusion | None = None) -> int:
    """The step of ``resume_dir``'s checkpoint, after checking it was trained by this spec.

    The checkpoint is read whole and its checksum verified (a corrupt one raises
    :class:`~diffusers_kit.checkpoint.CheckpointError`); temporary files a killed write left in
    the folder are removed. Spec fields that differ from the run's are listed; those named in
    ``allow_change`` (a field or a section: ``train.optimizer.lr``, ``train.optimizer``) may
    differ, for example to recover from divergence with a smaller learning rate. With
    ``diffusion``, its network must load the checkpoint's weights."""
    def refuse(expected: str) -> SpecError:
        return SpecError([SpecIssue(("--resume",), expected, str(resume_dir), None,
                                    "command line", newest_run(resume_dir))])

    if not (resume_dir / CHECKPOINT).is_file():
        raise refuse(f"a run folder holding {CHECKPOINT}")
    linked = [name for name in RUN_FILES if (resume_dir / name).is_symlink()]
    if linked:  # resuming writes these: never through a link to a file elsewhere
        raise refuse("a run folder whose files are its own, not symbolic links "
                     f"({', '.join(linked)} link elsewhere)")
    remove_orphans(resume_dir, CHECKPOINT)
    tensors, metadata = load_checkpoint(resume_dir / CHECKPOINT)
    try:
        previous = read_spec(resume_dir)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise refuse(f"a readable run folder with its {SPEC_FILE} ({exc})") from None
    if not isinstance(previous, dict):
        raise CheckpointError(resume_dir / SPEC_FILE, "not the resolved spec of a run "
                              "(a YAML mapping)")
    training = metadata.get("training")
    if training is None:
        raise refuse("a checkpoint with training state (this one holds weights only)")
    missing = [k for k in TRAINING_META if not isinstance(training, dict) or k not in training]
    missing += [k for k in TRAINING_TENSORS if f"train.{k}" not in tensors]
    if missing:
        raise CheckpointError(resume_dir / CHECKPOINT, "its training state lacks "
                              f"{', '.join(missing)}: not a checkpoint dkit can resume")
    try:
        step = int(training["train_step"])
        ranks = int(training.get("world", 1))
        json.loads(training["optimizer"])["param_groups"]
    except (TypeError, ValueError, KeyError):
        raise CheckpointError(resume_dir / CHECKPOINT, "its training state is malformed "
                              "(train_step, world or optimizer)") from None
    steps = (resolved.get("train") or {}).get("steps")
    if isinstance(steps, int) and steps < step:
        raise SpecError([SpecIssue(("train", "steps"), f"at least {step}, the step the run in "
                                   f"{resume_dir} reached: a run's spec and training hash "
                                   "describe its weights, which have trained longer (start a "
                                   "new run for a shorter training)", steps, None,
                                   "command line")])
    changed = [d for section in TRAINING_SECTIONS
               for d in _differences(previous.get(section), resolved.get(section), (section,))]
    if ranks != world:
        raise refuse(f"as many data-parallel ranks as the run was trained with ({ranks}; this "
                     f"run has {world}), so that the data order continues")
    refused = [d for d in changed if not _allowed(d, allow_change)]
    if refused:
        raise refuse("a run of this same spec: only train.steps, train.log_every, "
                     "train.checkpoint_every and the sampling / evaluation sections may change; "
                     f"this spec differs in {', '.join(refused)} (to change them on purpose, "
                     f"add --allow-change {' --allow-change '.join(refused)})")
    if diffusion is not None and changed:
        try:
            diffusion.network.load_state_dict(unprefixed("network", tensors))
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise refuse(f"a checkpoint whose weights fit this spec's network, changed in "
                         f"{', '.join(changed)} ({first})") from None
    return step




def link_checkpoint(source: Path, run_dir: Path) -> None:
    """Give ``run_dir`` the checkpoint it sampled from: a hard link (no copy) where the file
    system allows, else a copy; either way the folder is self-contained for later references."""
    target = run_dir / CHECKPOINT
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
