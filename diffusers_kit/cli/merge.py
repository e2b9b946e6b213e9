"""``dkit merge SHARDS... -o OUT``: join the shards of ``dkit sample --shard K/N`` (or of
``dkit restore --shard K/N``) into one set; and the shard helpers both commands share.

A shard folder holds ``samples.npz`` / ``samples.png`` (its share) and ``shard.json``, its
manifest: the run (folder and the checkpoint's SHA-256), the seed, the total ``n``, the shard
``K/N``, the global sample indices ``[start, stop)`` it drew, the resolved solver, guidance and
labels, the batch size, and the SHA-256 of its ``samples.npz``. Shard ``K`` of ``N`` draws a
contiguous block of whole batches (:func:`shard_range`). Merging checks that every manifest agrees
(same run, checkpoint, seed, solver, guidance, labels, ``n`` and ``N``), that no file changed
since it was written, and that every index ``0 .. n - 1`` is there exactly once; anything else
is exit status 2 naming the shards that are missing or given twice. The merged set is written
as ``OUT/samples.npz`` and ``OUT/samples.png``, as ``dkit sample`` writes them.

A restoration shard (``kind: restore`` in its manifest) holds ``restore.npz`` with its whole
images and their restorations (the rows ``[start, stop)`` of the ``n = images x
samples_per_image`` restorations, whole batches that are whole images); merging joins the
arrays and judges the joined restorations again (:func:`diffusers_kit.restore.
restoration_metrics`), writing ``OUT/restore.npz``, ``restore.png`` and ``restore.json`` as
``dkit restore`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

from diffusers_kit.console import make_console
from diffusers_kit.spec.errors import SpecError, SpecIssue, command_line_error

MANIFEST = "shard.json"
#: the manifest fields every shard of one set must share
SHARED = ("run", "checkpoint_sha256", "seed", "n", "shards", "batch_size", "solver", "guidance",
          "labels", "init")
#: the same for the shards of a restoration (``restore``: its resolved section, with the solver
#: and batch size used; ``n``: images x samples_per_image restorations)
RESTORE_SHARED = ("kind", "run", "checkpoint_sha256", "seed", "n", "shards", "batch_size",
                  "restore", "images")
#: a manifest's ``kind`` (none: ``sample``) -> the file it holds, its shared fields, what it counts
KINDS = {"sample": ("samples.npz", SHARED, "samples"),
         "restore": ("restore.npz", RESTORE_SHARED, "restorations")}


def shard_batch(n: int, count: int, batch_size: int | None, data_shape: Sequence[int]) -> int:
    """The batch every shard of ``count`` draws its samples in: ``batch_size``
    (``sample.batch_size``) when set, else :func:`~diffusers_kit.diffusion.default_batch_size` for
    all ``n`` capped at ``n // count`` (so that there are at least ``count`` batches)."""
    from diffusers_kit.diffusion import default_batch_size

    if batch_size is not None:
        return int(batch_size)
    return max(1, min(default_batch_size(n, data_shape), n // count))


def shard_range(k: int, count: int, n: int, batch: int) -> tuple[int, int]:
    """The global sample indices ``[start, stop)`` of shard ``k`` of ``count`` over ``n``
    samples drawn in batches of ``batch``: the ``m = ceil(n / batch)`` batches are dealt out
    in contiguous blocks, shard ``k`` taking batches ``k m // count .. (k + 1) m // count - 1``.
    Every batch is then one of the batches an unsharded draw with this batch size computes,
    row for row, which is what makes the merged samples equal it bit for bit (a network's
    result for a row may depend on the other rows of its batch in the last bit)."""
    batches = -(-n // batch)
    return min(n, k * batches // count * batch), min(n, (k + 1) * batches // count * batch)


def parse_shard(text: str, option: str = "--shard") -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)`` with ``0 <= K < N``; anything else is a command-line error."""
    parts = text.split("/")
    try:
        k, count = (int(part) for part in parts)
    except ValueError:
        k, count = -1, 0
    if len(parts) != 2 or count < 1 or not 0 <= k < count:
        raise SpecError([SpecIssue((option,), "K/N with 0 <= K < N, e.g. 0/4 (shards count "
                                   "from 0, like RANK and SLURM_ARRAY_TASK_ID)", text, None,
                                   "command line")])
    return k, count


def shard_from(args: argparse.Namespace, environ: dict[str, str] | None = None
               ) -> tuple[int, int] | None:
    """The shard to compute: ``--shard K/N``, else ``RANK/WORLD_SIZE`` under torchrun (a world
    of more than one process), else None (everything)."""
    environ = dict(os.environ) if environ is None else environ
    if args.shard is not None:
        return parse_shard(args.shard)
    world = environ.get("WORLD_SIZE", "").strip()
    if world and world != "1":
        text = f"{environ.get('RANK', '').strip()}/{world}"
        return parse_shard(text, "RANK/WORLD_SIZE (torchrun's environment)")
    return None


def use_local_gpu() -> None:
    """Under torchrun each process of a node takes its own GPU (``LOCAL_RANK``); a shard needs
    no process group, the shards never talk to each other."""
    import torch

    local = os.environ.get("LOCAL_RANK", "").strip()
    if local.isdigit() and torch.cuda.is_available() and int(local) < torch.cuda.device_count():
        torch.cuda.set_device(int(local))


def plan_shard(shard: tuple[int, int], n: int, batch_size: int | None,
               data_shape: Sequence[int], *, most: str, multiple: int = 1,
               batch_field: str = "sample.batch_size") -> tuple[int, int, int]:
    """``(batch, start, stop)`` of shard ``K/N`` over ``n`` rows (:func:`shard_batch`,
    :func:`shard_range`); ``multiple``: the batch is a multiple of it (a restoration's
    ``samples_per_image``, so that a shard holds whole images). Too many shards, or a given
    ``batch_size`` that is not a multiple, is a command-line error; ``most`` says how many
    shards there can be at most, and why (``"n = 10 shards (each draws at least one
    sample)"``)."""
    k, count = shard
    if count > n // multiple:
        raise command_line_error("--shard", f"at most {most}", f"{k}/{count}")
    if batch_size is not None and batch_size % multiple:
        raise command_line_error(batch_field, f"a multiple of {multiple} (a shard holds whole "
                                 "images)", batch_size)
    batch = shard_batch(n, count, batch_size, data_shape)
    batch = max(multiple, batch - batch % multiple)
    if -(-n // batch) < count:
        raise command_line_error("--shard", f"at most {-(-n // batch)} shards: n = {n} in "
                                 f"batches of {batch_field} = {batch}", f"{k}/{count}")
    return (batch, *shard_range(k, count, n, batch))


def run_identity(run_dir: str | Path) -> tuple[Path, str]:
    """The run folder (resolved, ``latest`` followed) and its checkpoint's SHA-256: what every
    shard records of the run it used."""
    from diffusers_kit.run.build import run_document
    from diffusers_kit.run_folder import CHECKPOINT

    folder = run_document(run_dir)[0].resolve()
    return folder, file_sha256(folder / CHECKPOINT)


@contextlib.contextmanager
def shard_folder(parent: Path, label: str, shared: dict[str, Any],
                 shard: tuple[int, int]) -> Iterator[Path]:
    """``parent/shards-<label>-<hash>/shard-K-of-N``, where ``<hash>`` is a digest of
    ``shared`` (what every shard of the set must agree on), so that shards computed with other
    settings never land beside each other. A shard that exists is refused; a shard that fails
    removes its own folder, and the set's folder only while empty (never its neighbours)."""
    k, count = shard
    key = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()
                         ).hexdigest()[:10]
    out = parent / f"shards-{label}-{key}" / f"shard-{k}-of-{count}"
    if out.exists():
        raise command_line_error("--shard", f"a shard not computed yet (remove {out} to compute "
                                 "it again)", f"{k}/{count}")
    created = [p for p in (out.parent.parent, out.parent) if not p.exists()]
    try:
        yield out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        for folder in reversed(created):  # other shards may be writing there: only if empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def write_manifest(out: Path, shared: dict[str, Any], shard: tuple[int, int],
                   indices: tuple[int, int], **extra: Any) -> None:
    """Write ``out/shard.json``: ``shared``, the shard, its ``indices`` and the SHA-256 of its
    data file (:data:`KINDS`). Written last: a shard folder without it is unfinished."""
    from diffusers_kit.run_folder import write_json

    data = KINDS[shared.get("kind", "sample")][0]
    manifest = {**shared, "shard": shard[0], "indices": list(indices),
                f"{Path(data).stem}_sha256": file_sha256(out / data), **extra}
    write_json(out / MANIFEST, manifest)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="join the shards of dkit sample or dkit "
                                   "restore --shard K/N")
    parser.add_argument("shards", nargs="+", metavar="SHARD_DIR",
                        help="shard folders (holding shard.json), or folders holding them")
    parser.add_argument("-o", "--out", required=True, metavar="OUT",
                        help="folder for the merged samples (samples.npz, samples.png) or "
                             "restorations (restore.npz, restore.png, restore.json)")
    parser.add_argument("--run", metavar="RUN_DIR",
                        help="the run folder, when it is not where the shards say (another "
                             "machine's path); its checkpoint must be the one they used")
    parser.set_defaults(func=merge_command)


def find_shards(paths: list[str]) -> list[Path]:
    """The shard folders named: each path is a shard folder or a folder whose subfolders are."""
    found: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if (path / MANIFEST).is_file():
            found.append(path)
        elif path.is_dir() and (inner := sorted(p for p in path.iterdir()
                                                if (p / MANIFEST).is_file())):
            found.extend(inner)
        else:
            raise command_line_error("SHARD_DIR", f"a shard folder holding {MANIFEST}, or a "
                                     "folder holding shard folders", text)
    return found


def read_manifests(folders: list[Path]) -> list[dict[str, Any]]:
    """Every shard's manifest, checked: readable, unchanged since written, and agreeing with the
    others on every shared field (:data:`KINDS`); no index missing or computed twice."""
    manifests = []
    for folder in folders:
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            kind = manifest.get("kind", "sample")
            data, shared, _ = KINDS[kind]
            digest = f"{Path(data).stem}_sha256"
            missing = [key for key in (*shared, "shard", "indices", digest)
                       if key not in manifest]
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise command_line_error("SHARD_DIR", f"a readable {MANIFEST} of dkit sample or "
                                     "restore --shard", f"{folder} ({exc!r})") from None
        if missing:
            raise command_line_error("SHARD_DIR", f"a {MANIFEST} written by dkit {kind} --shard",
                                     f"{folder / MANIFEST} lacks {', '.join(missing)}")
        path = folder / data
        if not path.is_file() or file_sha256(path) != manifest[digest]:
            raise command_line_error("SHARD_DIR", f"the {data} its shard.json was written with "
                                     "(same SHA-256)",
                                     f"missing or changed since it was written: {path}")
        manifest["folder"] = str(folder)
        manifest["kind"] = kind
        manifests.append(manifest)
    first = manifests[0]
    _, shared, unit = KINDS[first["kind"]]
    for manifest in manifests[1:]:
        for key in ("kind", *shared):
            if manifest[key] != first[key]:
                raise command_line_error("SHARD_DIR", f"shards of one set (the same {key})",
                                         f"{key} {json.dumps(first[key])} in {first['folder']} but "
                                         f"{json.dumps(manifest[key])} in {manifest['folder']}")
    count, n, batch = first["shards"], first["n"], first["batch_size"]
    by_shard: dict[int, list[str]] = {}
    for manifest in manifests:
        by_shard.setdefault(manifest["shard"], []).append(manifest["folder"])
    twice = {k: where for k, where in sorted(by_shard.items()) if len(where) > 1}
    if twice:
        raise command_line_error("SHARD_DIR", "each shard once", "; ".join(
            f"shard {k}/{count} given {len(where)} times ({', '.join(where)})"
            for k, where in twice.items()))
    missing_shards = [k for k in range(count) if k not in by_shard]
    if missing_shards:
        raise command_line_error(
            "SHARD_DIR", f"all {count} shards of {n} {unit}", "missing " + ", ".join(
                "shard {}/{} ({} {}..{})".format(k, count, unit,
                                                 *_last(shard_range(k, count, n, batch)))
                for k in missing_shards))
    manifests.sort(key=lambda manifest: manifest["shard"])
    for manifest in manifests:
        span = shard_range(manifest["shard"], count, n, batch)
        if list(manifest["indices"]) != list(span):
            raise command_line_error("SHARD_DIR",
                                     f"shard {manifest['shard']}/{count} holding {unit} {span}",
                                     f"indices {manifest['indices']} in {manifest['folder']}")
    return manifests


def _last(span: tuple[int, int]) -> tuple[int, int]:
    return span[0], span[1] - 1


def merge_command(args: argparse.Namespace) -> int:
    manifests = read_manifests(find_shards(args.shards))
    first = manifests[0]
    from diffusers_kit.run.build import run_document
    from diffusers_kit.run_folder import CHECKPOINT

    folder, _ = run_document(args.run or first["run"])
    if file_sha256(folder / CHECKPOINT) != first["checkpoint_sha256"]:
        raise command_line_error("--run" if args.run else "SHARD_DIR", "the run whose checkpoint "
                                 "the shards were computed with (same SHA-256)",
                                 f"{folder / CHECKPOINT} differs")
    out = Path(args.out).expanduser()
    if first["kind"] == "restore":
        _merge_restorations(manifests, folder, out)
        what = f"{first['n']} restorations of {first['images']} images"
    else:
        _merge_samples(manifests, folder, out)
        what = f"{first['n']} samples"
    make_console().print(f"{what} from {first['shards']} shards in "
                         f"[bold]{escape(str(out))}[/]", soft_wrap=True)
    return 0


def _arrays(manifests: list[dict[str, Any]], data: str) -> dict[str, Any]:
    """The arrays of every shard's data file, joined in shard order."""
    import numpy as np

    parts: dict[str, list] = {}
    for manifest in manifests:
        with np.load(Path(manifest["folder"]) / data) as npz:
            for name in npz.files:
                parts.setdefault(name, []).append(npz[name])
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def _merge_samples(manifests: list[dict[str, Any]], folder: Path, out: Path) -> None:
    import torch

    from diffusers_kit.run import open_run
    from diffusers_kit.run_folder import write_json
    from diffusers_kit.solvers.base import SampleResult

    first = manifests[0]
    arrays = _arrays(manifests, "samples.npz")
    samples = torch.from_numpy(arrays["samples"])
    if len(samples) != first["n"]:
        raise command_line_error("SHARD_DIR", f"{first['n']} samples in all", f"{len(samples)}")
    spec, components = open_run(folder)
    result = SampleResult(samples, 0)
    result.labels = torch.from_numpy(arrays["labels"]) if "labels" in arrays else None
    data = components.data
    result.save(out, components.dataset, columns=spec.output.grid_columns,
                reference=data.heldout if data is not None else None)
    info = {key: first[key] for key in SHARED}
    info["merged_from"] = [manifest["folder"] for manifest in manifests]
    write_json(out / "sampling.json", info)


def _merge_restorations(manifests: list[dict[str, Any]], folder: Path, out: Path) -> None:
    """Join restoration shards and judge the whole set again, with the run's restore section
    as the shards used it (their manifest), so the figures are those of one ``dkit restore``."""
    import torch

    from diffusers_kit.restore import Restoration, restoration_metrics, write_restoration
    from diffusers_kit.run import open_run
    from diffusers_kit.run.build import set_option
    from diffusers_kit.run_folder import write_json

    first = manifests[0]
    arrays = {name: torch.from_numpy(array)
              for name, array in _arrays(manifests, "restore.npz").items()}
    if len(arrays["samples"]) != first["n"] or len(arrays["truth"]) != first["images"]:
        raise command_line_error("SHARD_DIR", f"{first['n']} restorations of {first['images']} "
                                 "images in all",
                                 f"{len(arrays['samples'])} of {len(arrays['truth'])}")

    def as_shards(document) -> None:  # type: ignore[no-untyped-def]
        # the images are in the shards' arrays: the file they came from is not read again
        section = {**first["restore"], "images": "heldout"}
        set_option(document, ("restore",), section, f"{MANIFEST} (restore)")
        set_option(document, ("seed",), first["seed"], f"{MANIFEST} (seed)")

    spec, components = open_run(folder, options=as_shards)
    assert spec.restore is not None and components.restore_method is not None
    k = spec.restore.samples_per_image
    operator = components.restore_method.operator
    naive = operator.pinv(arrays["measurement"].double())
    metrics = restoration_metrics(operator, arrays["truth"], arrays["measurement"], naive,
                                  arrays["samples"], k, first["seed"])
    nfe = int(first["nfe"])  # of each restoration: the same in every shard
    seconds = sum(float(manifest["seconds"]) for manifest in manifests)
    metrics.update(nfe=float(nfe), seconds=seconds)
    result = Restoration(arrays["truth"], arrays["measurement"], naive.float(),
                         arrays["samples"], k, nfe, seconds, metrics)
    out.mkdir(parents=True, exist_ok=True)
    write_restoration(result, out, components.dataset)
    write_json(out / "spec.json", first["restore"])
    info = {key: first[key] for key in RESTORE_SHARED}
    info["merged_from"] = [manifest["folder"] for manifest in manifests]
    write_json(out / "restoration.json", info)
