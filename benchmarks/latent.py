"""Latent against pixel diffusion, side by side, on the 16x16 digits.

    cd /work/measure  # where the runs live
    dkit run /work/main/specs/latent_digits.yaml            # builds autoencoder_digits first
    dkit run /work/main/benchmarks/specs/pixel_digits16.yaml
    OMP_NUM_THREADS=1 python benchmarks/latent.py [--root runs] [--n 200] [--repeats 3]

The two specs differ only where they must: ``latent_digits`` diffuses the 4x4x4 latents of
``autoencoder_digits`` with a U-Net whose levels run at 4 and 2 pixels; ``pixel_digits16``
diffuses the 16x16 images with the same U-Net (same widths, blocks, attention at the lower
level, class tokens, class dropout), whose levels run at 16 and 8 pixels. Same process, objective,
optimizer, steps, batch, sampler (DDIM, 50 steps), guidance (classifier-free, w = 3) and metrics.

Reported per model: parameters; training time (the run's own ``time_train_s``; the latent one
plus the autoencoder's, from its run); sampling time per image at equal NFE, measured here in
one process, the two models interleaved ``--repeats`` times (median), ``--n`` images in one
batch, the latent model's decoding included (and shown apart); class accuracy, Fréchet distance
and KID in the 16x16 feature space (from each run's metrics.json, with their floors). One
thread of a shared 2-core CPU: the times are indicative, their ratio less so than their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from diffusers_kit import Diffusion
from diffusers_kit.guidance import ClassifierFree
from diffusers_kit.latent import decode
from diffusers_kit.metrics.reconstruction import ReconstructionQuality
from diffusers_kit.pipeline import follow_latest
from diffusers_kit.solvers import DDIM

MODELS = {"latent": "latent_digits", "pixel": "pixel_digits16"}


def figure(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    floor = metrics.get(f"{key}_floor")
    low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
    text = f"{value:.3g}"
    if low is not None and high is not None:
        text += f" [{low:.3g}, {high:.3g}]"
    if floor is not None:
        text += f" (floor {floor:.3g})"
    return text


def _pixel_data(folder: Path) -> Any:
    from diffusers_kit.graph import open_run

    _, components = open_run(folder)
    return components.data


def sampling_seconds(model: Diffusion, n: int, steps: int) -> tuple[float, float]:
    """Seconds to draw ``n`` class-guided images (all of them, one batch) and, for a latent
    model, the part of it spent decoding."""
    solver = DDIM(steps=steps)
    guidance = [ClassifierFree(scale=3.0)]
    start = time.perf_counter()
    result = model.sample(n, solver, seed=0, batch_size=n, guidance=guidance, labels="all")
    total = time.perf_counter() - start
    decoding = 0.0
    if model.autoencoder is not None and result.latents is not None:
        start = time.perf_counter()
        decode(model.autoencoder, result.latents)
        decoding = time.perf_counter() - start
    return total, decoding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent-run", type=Path, help="default: ROOT/latent_digits/latest")
    parser.add_argument("--pixel-run", type=Path, help="default: ROOT/pixel_digits16/latest")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    given = {"latent": args.latent_run, "pixel": args.pixel_run}
    folders = {k: follow_latest(given[k] or args.root / name / "latest")
               for k, name in MODELS.items()}
    models = {k: Diffusion.from_run(folder) for k, folder in folders.items()}
    metrics = {k: json.loads((folder / "metrics.json").read_text())
               for k, folder in folders.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    decoding: list[float] = []
    for model in models.values():  # warm-up
        sampling_seconds(model, min(args.n, 20), 2)
    for _ in range(args.repeats):
        for k, model in models.items():
            total, decoded = sampling_seconds(model, args.n, args.steps)
            times[k].append(total)
            if decoded:
                decoding.append(decoded)
    per_image = {k: 1000 * statistics.median(v) / args.n for k, v in times.items()}
    autoencoder = models["latent"].autoencoder
    assert autoencoder is not None
    dependency = json.loads((folders["latent"] / "run.json").read_text())["dependencies"][0]
    first_stage_dir = Path(dependency["run"])
    first_stage = json.loads((first_stage_dir / "metrics.json").read_text())
    if "recon_psnr" not in first_stage:  # built as a dependency: train only, no evaluation
        ae_model = Diffusion.from_run(first_stage_dir)
        with ae_model.sampling_weights() as model:
            first_stage.update(ReconstructionQuality().evaluate(
                None, _pixel_data(folders["latent"]), torch.Generator().manual_seed(0), model))
    table = Table(title=f"latent vs pixel diffusion, 16x16 digits, DDIM {args.steps} steps + "
                        f"CFG, n = {args.n}, one thread", header_style="bold")
    for column in ("", "latent (4x4x4)", "pixel (1x16x16)", "latent / pixel"):
        table.add_column(column, justify="right" if column else "left")
    parameters = {k: m.network.parameter_count() for k, m in models.items()}
    table.add_row("diffusion U-Net parameters", f"{parameters['latent']:,}",
                  f"{parameters['pixel']:,}", f"{parameters['latent'] / parameters['pixel']:.2f}")
    train = {k: metrics[k].get("time_train_s") for k in models}
    ae_train = first_stage.get("time_train_s") or 0.0
    table.add_row("training time (s)", f"{train['latent']:.0f} + {ae_train:.0f} autoencoder",
                  f"{train['pixel']:.0f}",
                  f"{(train['latent'] + ae_train) / train['pixel']:.2f}")
    decode_ms = 1000 * statistics.median(decoding) / args.n if decoding else 0.0
    table.add_row("sampling ms / image (50 NFE)",
                  f"{per_image['latent']:.2f} (decoding {decode_ms:.3f})",
                  f"{per_image['pixel']:.2f}",
                  f"{per_image['latent'] / per_image['pixel']:.3f} "
                  f"({per_image['pixel'] / per_image['latent']:.1f}x faster)")
    for key in ("class_accuracy", "fd", "kid"):
        table.add_row(key, figure(metrics["latent"], key), figure(metrics["pixel"], key), "")
    table.add_row("autoencoder PSNR (dB)", figure(first_stage, "recon_psnr"), "–", "")
    Console(width=200).print(table)
    print("runs:", {k: str(v) for k, v in folders.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
