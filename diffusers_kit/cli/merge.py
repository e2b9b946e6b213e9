"""``dkit merge SHARDS... -o OUT``: join the shards of ``dkit sample --shard K/N`` into one set.

A shard folder holds ``samples.npz`` / ``samples.png`` (its share) and ``shard.json``, its
manifest: the run (folder and the checkpoint's SHA-256), the seed, the total ``n``, the shard
``K/N``, the global sample indices ``[start, stop)`` it drew, the resolved solver, guidance and
labels, the batch size, and the SHA-256 of its ``samples.npz``. Shard ``K`` of ``N`` draws a
contiguous block of whole batches (:func:`shard_range`). Merging checks that every manifest agrees
(same run, checkpoint, seed, solver, guidance, labels, ``n`` and ``N``), that no file changed
since it was written, and that every index ``0 .. n - 1`` is there exactly once; anything else
is exit status 2 naming the shards that are missing or given twice. The merged set is written
as ``OUT/samples.npz`` and ``OUT/samples.png``, as ``dkit sample`` writes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

from diffusers_kit.console import make_console
from diffusers_kit.spec.errors import SpecError, SpecIssue

MANIFEST = "shard.json"
#: the manifest fields every shard of one set must share
SHARED = ("run", "checkpoint_sha256", "seed", "n", "shards", "batch_size", "solver", "guidance",
          "labels", "init")


def shard_batch(n: int, count: int, batch_size: int | None, data_shape: Sequence[int]) -> int:
    """The batch every shard of ``count`` draws its samples in: ``batch_size``
    (``sample.batch_size``) when set, else :func:`~diffusers_kit.api.default_batch_size` for
    all ``n`` capped at ``n // count`` (so that there are at least ``count`` batches)."""
    from diffusers_kit.api import default_batch_size

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


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="join the shards of dkit sample --shard K/N")
    parser.add_argument("shards", nargs="+", metavar="SHARD_DIR",
                        help="shard folders (holding shard.json), or folders holding them")
    parser.add_argument("-o", "--out", required=True, metavar="OUT",
                        help="folder for the merged samples.npz and samples.png")
    parser.add_argument("--run", metavar="RUN_DIR",
                        help="the run folder, when it is not where the shards say (another "
                             "machine's path); its checkpoint must be the one they used")
    parser.set_defaults(func=merge_command)


def _fail(field: str, expected: str, given: object) -> SpecError:
    return SpecError([SpecIssue((field,), expected, given, None, "command line")])


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
            raise _fail("SHARD_DIR", f"a shard folder holding {MANIFEST}, or a folder holding "
                        "shard folders", text)
    return found


def read_manifests(folders: list[Path]) -> list[dict[str, Any]]:
    """Every shard's manifest, checked: readable, unchanged since written, and agreeing with the
    others on every :data:`SHARED` field; no index missing or drawn twice."""
    manifests = []
    for folder in folders:
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            missing = [key for key in (*SHARED, "shard", "indices", "samples_sha256")
                       if key not in manifest]
        except (OSError, ValueError) as exc:
            raise _fail("SHARD_DIR", f"a readable {MANIFEST}", f"{folder} ({exc})") from None
        if missing:
            raise _fail("SHARD_DIR", f"a {MANIFEST} written by dkit sample --shard",
                        f"{folder / MANIFEST} lacks {', '.join(missing)}")
        samples = folder / "samples.npz"
        if not samples.is_file() or file_sha256(samples) != manifest["samples_sha256"]:
            raise _fail("SHARD_DIR", "the samples.npz its shard.json was written with (same "
                        "SHA-256)", f"missing or changed since it was written: {samples}")
        manifest["folder"] = str(folder)
        manifests.append(manifest)
    first = manifests[0]
    for manifest in manifests[1:]:
        for key in SHARED:
            if manifest[key] != first[key]:
                raise _fail("SHARD_DIR", f"shards of one set (the same {key})",
                            f"{key} {json.dumps(first[key])} in {first['folder']} but "
                            f"{json.dumps(manifest[key])} in {manifest['folder']}")
    count, n, batch = first["shards"], first["n"], first["batch_size"]
    by_shard: dict[int, list[str]] = {}
    for manifest in manifests:
        by_shard.setdefault(manifest["shard"], []).append(manifest["folder"])
    twice = {k: where for k, where in sorted(by_shard.items()) if len(where) > 1}
    if twice:
        raise _fail("SHARD_DIR", "each shard once", "; ".join(
            f"shard {k}/{count} given {len(where)} times ({', '.join(where)})"
            for k, where in twice.items()))
    missing_shards = [k for k in range(count) if k not in by_shard]
    if missing_shards:
        raise _fail("SHARD_DIR", f"all {count} shards of {n} samples", "missing " + ", ".join(
            "shard {}/{} (samples {}..{})".format(k, count, *_last(shard_range(k, count, n, batch)))
            for k in missing_shards))
    manifests.sort(key=lambda manifest: manifest["shard"])
    for manifest in manifests:
        span = shard_range(manifest["shard"], count, n, batch)
        if list(manifest["indices"]) != list(span):
            raise _fail("SHARD_DIR", f"shard {manifest['shard']}/{count} holding samples {span}",
                        f"indices {manifest['indices']} in {manifest['folder']}")
    return manifests


def _last(span: tuple[int, int]) -> tuple[int, int]:
    return span[0], span[1] - 1


def merge_command(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from diffusers_kit.run import open_run
    from diffusers_kit.run.build import run_document
    from diffusers_kit.run_folder import CHECKPOINT
    from diffusers_kit.solvers.base import SampleResult

    manifests = read_manifests(find_shards(args.shards))
    first = manifests[0]
    run_dir = args.run or first["run"]
    folder, _ = run_document(run_dir)
    if file_sha256(folder / CHECKPOINT) != first["checkpoint_sha256"]:
        raise _fail("--run" if args.run else "SHARD_DIR", "the run whose checkpoint the shards "
                    "were drawn with (same SHA-256)", f"{folder / CHECKPOINT} differs")
    arrays: dict[str, list] = {"samples": [], "labels": []}
    for manifest in manifests:
        with np.load(Path(manifest["folder"]) / "samples.npz") as npz:
            arrays["samples"].append(npz["samples"])
            if "labels" in npz.files:
                arrays["labels"].append(npz["labels"])
    samples = torch.from_numpy(np.concatenate(arrays["samples"]))
    if len(samples) != first["n"]:
        raise _fail("SHARD_DIR", f"{first['n']} samples in all", f"{len(samples)}")
    spec, components = open_run(folder)
    result = SampleResult(samples, 0)
    result.labels = (torch.from_numpy(np.concatenate(arrays["labels"]))
                     if arrays["labels"] else None)
    out = Path(args.out).expanduser()
    data = components.data
    result.save(out, components.dataset, columns=spec.output.grid_columns,
                reference=data.heldout if data is not None else None)
    from diffusers_kit.run_folder import write_json

    info = {key: first[key] for key in SHARED}
    info["merged_from"] = [manifest["folder"] for manifest in manifests]
    write_json(out / "sampling.json", info)
    make_console().print(f"{first['n']} samples from {first['shards']} shards in "
                         f"[bold]{escape(str(out))}[/]", soft_wrap=True)
    return 0
