"""The guidance trade-off on the 8x8 digits: class accuracy and Fréchet distance against the
guidance scale, for classifier-free guidance and for classifier guidance.

    OMP_NUM_THREADS=1 python benchmarks/guidance_sweep.py --root runs \\
        --cfg-run runs/cfg_digits/latest --cg-run runs/ddpm/latest \\
        --classifier specs/classifier_digits.yaml [--n 500] [--only cfg|classifier] [--out docs]

- classifier-free: the class-conditional model of a finished ``specs/cfg_digits.yaml`` run,
  ``ClassifierFree(w)`` for w in 0, 1, 2, 3, 4, 8 (0: unconditional, 1: conditional);
- classifier: the unconditional model of a finished ``specs/ddpm.yaml`` run, guided by the
  noise-aware classifier ``--classifier`` (a spec, resolved under ``--root`` and trained there
  first when no finished run has its hash, or a run folder), ``ClassifierGuidance(s)`` for
  s in 0, 1, 2, 4, 8, 16 (0: unguided).

Every setting draws ``--n`` samples with ``labels="all"`` (equal blocks of the ten digits) by
DDIM (50 steps, x0 clipped to [-1, 1]) from the same seed, so sample ``i`` starts from the same
noise at every scale. Metrics, in the feature space of ``--features`` (specs/features_digits.yaml
by default, resolved under ``--root``): class accuracy (the fraction the feature network
classifies as requested; its floor is the feature network's own held-out accuracy) and the
Fréchet distance to the held-out digits (its floor: training vs held-out digits, same n), each
with its 95 % bootstrap interval. FD compares ``min(n, held-out)`` samples, a seeded random
subset (the metric draws it), so that the label-ordered samples are not cut short of the last
digits.

Writes, under ``--out`` (docs/ by default): ``guidance_tradeoff.png`` (one panel per guidance
kind: class accuracy on the left axis, FD on the right, against the scale),
``guidance_cfg_grid.png`` (rows w = 0, 1, 3, 8; one sample of each digit 0..9 per row) and
``guidance_classifier_grid.png`` (rows s = 0, 1, 4, 16). The markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from diffusers_kit import Diffusion
from diffusers_kit.data.base import Dataset, DataSplits
from diffusers_kit.graph import open_run
from diffusers_kit.guidance import ClassifierFree, ClassifierGuidance, Guidance
from diffusers_kit.metrics import ClassAccuracy, FrechetDistance
from diffusers_kit.pipeline import TrainedModel
from diffusers_kit.report import Series, labelled_grid, metric_plot, nice_ticks
from diffusers_kit.solvers import DDIM

ROOT = Path(__file__).resolve().parents[1]
CFG_SCALES = (0.0, 1.0, 2.0, 3.0, 4.0, 8.0)
CG_SCALES = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
CFG_GRID = (0.0, 1.0, 3.0, 8.0)
CG_GRID = (0.0, 1.0, 4.0, 16.0)
CLASSES = 10


@dataclass
class Point:
    """One setting of a sweep: its scale, metrics, cost, and the samples drawn."""

    scale: float
    metrics: dict[str, float]
    nfe: int
    seconds: float
    samples: torch.Tensor
    labels: torch.Tensor


@dataclass
class Sweep:
    key: str  # "cfg" or "classifier"
    title: str
    symbol: str  # "w" or "s"
    points: list[Point]
    grid: tuple[float, ...]
    dataset: Dataset


def evaluate(samples: torch.Tensor, labels: torch.Tensor, data: DataSplits,
             accuracy: ClassAccuracy, fd: FrechetDistance, seed: int) -> dict[str, float]:
    """Class accuracy (every sample, against its requested label) and FD (on a seeded random
    subset of min(n, held-out) samples, drawn by the metric itself: see ``real_sets``)."""
    out = accuracy.evaluate(samples, data, torch.Generator().manual_seed(seed), labels=labels)
    out.update(fd.evaluate(samples, data, torch.Generator().manual_seed(seed)))
    return out


def sweep(diffusion: Diffusion, data: DataSplits, term: Callable[[float], Guidance],
          scales: Sequence[float], args: argparse.Namespace, accuracy: ClassAccuracy,
          fd: FrechetDistance, name: str) -> list[Point]:
    solver = DDIM(steps=50, clip_x0=1.0)
    points = []
    for scale in scales:
        started = time.perf_counter()
        result = diffusion.sample(args.n, solver, seed=args.seed,
                                  batch_size=args.batch_size or None,
                                  guidance=[term(scale)], labels="all")
        seconds = time.perf_counter() - started
        samples = result.samples.float().cpu()
        metrics = evaluate(samples, result.labels, data, accuracy, fd, args.seed)
        points.append(Point(scale, metrics, result.nfe, seconds, samples, result.labels))
        print(f"{name} {scale:g}: class accuracy {metrics['class_accuracy']:.3f}, "
              f"fd {metrics['fd']:.3g}, {result.nfe} NFE, {seconds:.1f} s", flush=True)
    return points


# -- output ----------------------------------------------------------------------------------
def interval(metrics: dict[str, float], key: str, digits: str) -> str:
    value, low, high = (metrics[f"{key}{s}"] for s in ("", "_low", "_high"))
    return f"{value:{digits}} [{low:{digits}}, {high:{digits}}]"


def markdown(sweeps: list[Sweep], n: int) -> str:
    lines = ["| guidance | scale | class accuracy [95 % CI] | FD [95 % CI] | NFE | time |",
             "|---|---:|---|---|---:|---:|"]
    for s in sweeps:
        for p in s.points:
            lines.append(f"| {s.title} | {s.symbol} = {p.scale:g} | "
                         f"{interval(p.metrics, 'class_accuracy', '.3f')} | "
                         f"{interval(p.metrics, 'fd', '.2f')} | {p.nfe} | {p.seconds:.0f} s |")
    lines.append("")
    for s in sweeps:
        m = s.points[0].metrics
        lines.append(
            f"Floors ({s.title}; n = {n} samples, FD on {int(m['fd_n'])}): class accuracy of "
            f"the feature network on held-out digits {interval(m, 'class_accuracy_floor', '.3f')}"
            f"; FD training vs held-out digits {interval(m, 'fd_floor', '.2f')}.")
    return "\n".join(lines)


def panel(s: Sweep, size: tuple[int, int], fd_ticks: list[float]) -> Image.Image:
    """Class accuracy (left axis) and FD (right axis, ticks ``fd_ticks``) against the scale
    (evenly spaced), with 95 % intervals and dashed floors (``report.metric_plot``)."""
    def series(key: str, name: str, **style: object) -> Series:
        points = [p.metrics for p in s.points]
        return Series(name, [m[key] for m in points], [m[f"{key}_low"] for m in points],
                      [m[f"{key}_high"] for m in points], points[0][f"{key}_floor"],
                      **style)  # type: ignore[arg-type]

    return metric_plot(
        [f"{p.scale:g}" for p in s.points],
        [series("class_accuracy", "class accuracy", axis="left", digits=".2f"),
         series("fd", "FD", axis="right", title="Frechet distance (FD)", digits=".3g")],
        s.title, f"guidance scale {s.symbol} (evenly spaced)", size=size,
        ticks={"left": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "right": fd_ticks},
        floor_label="floors (real digits)")


def tradeoff_plot(sweeps: list[Sweep], path: Path) -> None:
    """One panel per sweep, side by side, on a common FD axis (so the panels compare)."""
    size = (600, 440)
    top = max(max(p.metrics["fd_high"], p.metrics["fd"], p.metrics["fd_floor"])
              for s in sweeps for p in s.points if math.isfinite(p.metrics["fd_high"]))
    fd_ticks = nice_ticks(top * 1.05)
    image = Image.new("RGB", (size[0] * len(sweeps), size[1]), "white")
    for i, s in enumerate(sweeps):
        image.paste(panel(s, size, fd_ticks), (i * size[0], 0))
    image.save(path)


def sample_grid(s: Sweep, path: Path) -> None:
    """One row per scale in ``s.grid``, one column per digit (the first sample drawn for it):
    sample ``i`` starts from the same noise in every row."""
    by_scale = {p.scale: p for p in s.points}
    rows = []
    for scale in s.grid:
        p = by_scale[scale]
        first = [int((p.labels == c).nonzero()[0]) for c in range(CLASSES)]
        rows.append((f"{s.symbol} = {scale:g}", s.dataset.to_display(p.samples[first])))
    labelled_grid(rows, column_labels=[str(c) for c in range(CLASSES)], size=14).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs",
                        help="where referenced specs (features, classifier) are built")
    parser.add_argument("--cfg-run", default="runs/cfg_digits/latest",
                        help="a finished run of specs/cfg_digits.yaml")
    parser.add_argument("--cg-run", default="runs/ddpm/latest",
                        help="a finished run of an unconditional model (specs/ddpm.yaml)")
    parser.add_argument("--classifier", default="specs/classifier_digits.yaml",
                        help="the noise-aware classifier: a spec or a run folder")
    parser.add_argument("--features", default=str(ROOT / "specs" / "features_digits.yaml"),
                        help="the metrics' feature network: a spec or a run folder")
    parser.add_argument("--only", choices=("cfg", "classifier"), default=None)
    parser.add_argument("--n", type=int, default=500, help="samples per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=0, help="sampling batch (0: all)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where the pictures go")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.n < 2 * CLASSES:
        parser.error(f"--n must be at least {2 * CLASSES}")

    features = TrainedModel.resolve(args.features, root=args.root)
    accuracy, fd = ClassAccuracy(features), FrechetDistance(features)
    sweeps: list[Sweep] = []
    if args.only in (None, "cfg"):
        _, run = open_run(args.cfg_run)
        points = sweep(run.diffusion, run.data, lambda w: ClassifierFree(scale=w), CFG_SCALES,
                       args, accuracy, fd, "classifier-free w")
        sweeps.append(Sweep("cfg", "classifier-free guidance", "w", points, CFG_GRID,
                            run.dataset))
    if args.only in (None, "classifier"):
        classifier = TrainedModel.resolve(args.classifier, root=args.root)
        _, run = open_run(args.cg_run)
        points = sweep(run.diffusion, run.data,
                       lambda s: ClassifierGuidance(classifier, scale=s), CG_SCALES, args,
                       accuracy, fd, "classifier s")
        sweeps.append(Sweep("classifier", "classifier guidance", "s", points, CG_GRID,
                            run.dataset))

    print()
    print(markdown(sweeps, args.n))
    tradeoff_plot(sweeps, out / "guidance_tradeoff.png")
    for s in sweeps:
        sample_grid(s, out / f"guidance_{s.key}_grid.png")
    print(f"\nwrote {out / 'guidance_tradeoff.png'} and the sample grids "
          + ", ".join(str(out / f"guidance_{s.key}_grid.png") for s in sweeps))


if __name__ == "__main__":
    main()
