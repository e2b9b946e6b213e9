"""Inverse problems at our scale: the methods x tasks table of the DiffPIR / DDRM papers.

    cd <where the runs are>  # runs/ddpm, runs/features_digits (digits), runs/photos_ddpm
    OMP_NUM_THREADS=1 python benchmarks/inverse.py [--root runs] [--n 100] \
        [--tasks digits-box,...,photos-poisson] [--methods replacement,repaint,...] \
        [--out table.md] [--pictures DIR] [--tune]

Tasks (the first ``--n`` held-out images from ``--offset``, one restoration each, measurement
seed 0; Gaussian noise ``sigma_y = 0.05`` wherever a task has noise, as in DiffPIR's table):

- ``digits-*`` on the digits DDPM at ``ROOT/ddpm/latest`` (1x8x8; ``specs/ddpm.yaml``'s run,
  or as docs/inverse.md measured it, ``specs/min_snr_digits.yaml``'s placed there),
  ``photos-*`` on the photographs DDPM (``ROOT/photos_ddpm/latest``, ``specs/photos_ddpm.yaml``,
  3x32x32 patches of scikit-image's CC0 / public-domain photographs), pixels in [-1, 1];
- ``box`` (inpaint the centred hole of half the side, noiseless), ``random`` (inpaint, 30 % of
  the pixels kept, noiseless), ``sr2`` / ``sr4`` (block-average super-resolution),
  ``deblur`` (Gaussian blur of ``sigma = 1`` pixel), ``poisson`` (denoising under Poisson
  noise of ``PHOTONS`` photons at the top of the range), ``colorize`` (photographs only,
  noiseless).

Methods (``data_std = 0.5`` everywhere): ``replacement`` with DDIM (50 steps, ``eta = 0``,
``clip_x0 = 1``); ``repaint``: replacement with RePaint's resampling on a 250-step
sub-sequence, ``jump_length = 10``, ``resampling = 5``: 25 blocks of 10 steps each descended
5 times, 250 x 5 = 1,250 network evaluations, and ``repaint100`` the same resampling at the
goal's budget (20 steps, ``jump_length = 5``: 4 blocks of 5 each descended 5 times, 100
evaluations); ``pigdm`` (scale 1) and ``dps`` with DDIM 50
(``dps1``: DPS at ``zeta = 1``, untuned);
``ddrm`` (the paper's ``eta = 0.85``, ``eta_b = 1``) taking DDIM's 50 steps, ``ddrm20`` the
same on the paper's 20 and ``ddrm100`` on 100; ``pigdm100``: ΠGDM on DDIM 100 (the goal's
budget of 100 evaluations); ``diffpir`` with DDIM 50; ``ddnm`` with DDIM 50 at ``eta = 1`` (the
paper's ancestral sampler on that sub-sequence) and ``ddnm_plus`` taking DDIM's 50 steps.
DPS's ``zeta`` and DiffPIR's ``lam`` and DDIM ``eta`` (its ``zeta``, the share of fresh
noise) are per task: ``--tune`` picks them by mean PSNR on the tuning split (held-out images
``TUNE_OFFSET ..``, disjoint from the table's images ``0 .. n - 1``) and writes them to
``--settings FILE`` (JSON), which the table run then reads; without it DPS takes
``zeta = 1`` and DiffPIR ``lam = 1``, ``eta = 0``.

A method that cannot run a task (the SVD methods on Poisson noise) gets a row saying why.

Columns: PSNR and SSIM against the truth (mean [95 % bootstrap interval]); the consistency
``||y - A x|| / sqrt(m)`` (an exact posterior sample leaves about the noise's standard
deviation); the Fréchet distance to the held-out digits in the feature space of
``ROOT/features_digits/latest`` (digit tasks only; ``floor`` is the real-vs-real FD at the
same ``n``); network evaluations per restoration; sampling seconds per restoration (one
thread, batches of ``--batch-size``, on a shared machine: indicative). Each task's first row
is the baseline ``A^+ y`` (no network).

``--pictures DIR`` writes ``DIR/TASK.png``: the first 8 images, one row per method between the
measurement (``y`` when it has the data's shape, else ``A^+ y``) and the truth. ``--out``
appends each task's rows to a markdown file as it finishes. ``--tune`` instead prints the
tuning sweep (PSNR of each candidate setting of DPS and DiffPIR on ``--n`` tuning images) and
adds the best per task to ``--settings``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from diffusers_kit.forward_models.base import ForwardModel
from diffusers_kit.graph import open_run
from diffusers_kit.guidance import DDNM, DDRM, DPS, DDNMPlus, DiffPIR, PiGDM, Replacement
from diffusers_kit.guidance.measurement import MeasurementGuidance
from diffusers_kit.metrics import FrechetDistance
from diffusers_kit.metrics.floor import ErrorBars, mean_with_interval
from diffusers_kit.metrics.restoration import psnr_per_image, ssim_per_image
from diffusers_kit.pipeline import TrainedModel
from diffusers_kit.registry import get_registry
from diffusers_kit.report import labelled_grid
from diffusers_kit.restore import Restoration, consistency, restore
from diffusers_kit.solvers import DDIM, RePaint
from diffusers_kit.solvers.base import Solver

DATA_STD = 0.5
SIGMA_Y = 0.05
PHOTONS = 50  # Poisson: y's standard deviation is sqrt(2 (x + 1) / 50): 0.2 at mid-gray
PICTURE_COLUMNS = 8
TUNE_OFFSET = 200  # the tuning split: held-out images TUNE_OFFSET .. (the table uses 0 .. n-1)
ZETAS = (1.0, 3.0, 10.0, 30.0, 100.0)  # DPS's zeta (step: likelihood) on the tuning split
DIFFPIR = tuple((lam, eta) for lam in (0.3, 1.0, 3.0, 10.0) for eta in (0.0, 1.0))


@dataclass(frozen=True)
class Task:
    model: str  # the run under --root: ddpm (digits) or photos_ddpm (photographs)
    operator: dict
    fd: bool  # whether the digit feature network applies


OPERATORS = {
    "box": {"kind": "inpaint", "mask": "center", "box_size": 0.5},
    "random": {"kind": "inpaint", "mask": "random", "rate": 0.3},
    "sr2": {"kind": "super_resolution", "scale": 2, "sigma_y": SIGMA_Y},
    "sr4": {"kind": "super_resolution", "scale": 4, "sigma_y": SIGMA_Y},
    "deblur": {"kind": "blur", "sigma": 1.0, "sigma_y": SIGMA_Y},
    "colorize": {"kind": "colorize"},
    "poisson": {"kind": "denoise", "noise": "poisson", "photons": PHOTONS},
}
TASKS = {f"digits-{name}": Task("ddpm", op, True) for name, op in OPERATORS.items()
         if name != "colorize"}
TASKS |= {f"photos-{name}": Task("photos_ddpm", op, False) for name, op in OPERATORS.items()}

Settings = dict[str, float]  # dps_zeta, diffpir_lam, diffpir_eta; absent: 1, 1, 0

Method = Callable[[ForwardModel, Settings], MeasurementGuidance]
METHODS: dict[str, tuple[Method, Callable[[Settings], Solver]]] = {
    "replacement": (lambda op, _: Replacement(op, data_std=DATA_STD),
                    lambda _: DDIM(steps=50, clip_x0=1.0)),
    "repaint": (lambda op, _: Replacement(op, data_std=DATA_STD),
                lambda _: RePaint(steps=250, jump_length=10, resampling=5, clip_x0=1.0)),
    "repaint100": (lambda op, _: Replacement(op, data_std=DATA_STD),
                   lambda _: RePaint(steps=20, jump_length=5, resampling=5, clip_x0=1.0)),
    "pigdm": (lambda op, _: PiGDM(op, scale=1.0, data_std=DATA_STD),
              lambda _: DDIM(steps=50, clip_x0=1.0)),
    "dps": (lambda op, k: DPS(op, zeta=k.get("dps_zeta", 1.0), data_std=DATA_STD),
            lambda _: DDIM(steps=50, clip_x0=1.0)),
    "dps1": (lambda op, _: DPS(op, zeta=1.0, data_std=DATA_STD),
             lambda _: DDIM(steps=50, clip_x0=1.0)),
    "ddrm": (lambda op, _: DDRM(op, eta=0.85, eta_b=1.0),
             lambda _: DDIM(steps=50, clip_x0=1.0)),
    "ddrm20": (lambda op, _: DDRM(op, eta=0.85, eta_b=1.0),
               lambda _: DDIM(steps=20, clip_x0=1.0)),
    "ddrm100": (lambda op, _: DDRM(op, eta=0.85, eta_b=1.0),
                lambda _: DDIM(steps=100, clip_x0=1.0)),
    "pigdm100": (lambda op, _: PiGDM(op, scale=1.0, data_std=DATA_STD),
                 lambda _: DDIM(steps=100, clip_x0=1.0)),
    "diffpir": (lambda op, k: DiffPIR(op, lam=k.get("diffpir_lam", 1.0)),
                lambda k: DDIM(steps=50, eta=k.get("diffpir_eta", 0.0), clip_x0=1.0)),
    "ddnm": (lambda op, _: DDNM(op), lambda _: DDIM(steps=50, eta=1.0, clip_x0=1.0)),
    "ddnm_plus": (lambda op, _: DDNMPlus(op), lambda _: DDIM(steps=50, clip_x0=1.0)),
}


def interval(metrics: dict[str, float], name: str, digits: int) -> str:
    """``mean [low, high]``."""
    m, lo, hi = metrics[name], metrics[f"{name}_low"], metrics[f"{name}_high"]
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def image_metrics(x: torch.Tensor, truth: torch.Tensor, operator: ForwardModel,
                  y: torch.Tensor) -> dict[str, float]:
    """PSNR, SSIM and consistency of ``x`` against ``truth`` / ``y``, as restore() computes
    them (the same SSIM window and bootstrap), for the ``A^+ y`` baseline."""
    generator, bars = torch.Generator().manual_seed(0), ErrorBars()
    x, truth = x.double(), truth.double()
    size = min(7, x.shape[-1] - (1 - x.shape[-1] % 2))
    out = mean_with_interval("psnr", psnr_per_image(x, truth, -1.0, 1.0), generator, bars)
    out.update(mean_with_interval("ssim", ssim_per_image(x, truth, -1.0, 1.0, max(3, size), 1.5),
                                  generator, bars))
    out.update(mean_with_interval("consistency", consistency(operator, x, y.double()),
                                  generator, bars))
    return out


def fd_cell(fd: FrechetDistance | None, samples: torch.Tensor, data) -> str:  # type: ignore[no-untyped-def]
    if fd is None:
        return "—"
    out = fd.evaluate(samples.float(), data, torch.Generator().manual_seed(0))
    return (f"{out['fd']:.1f} [{out['fd_low']:.1f}, {out['fd_high']:.1f}] "
            f"(floor {out['fd_floor']:.1f})")


def noise_cell(operator: ForwardModel) -> str:
    """The measurement noise's standard deviation, for the consistency column."""
    if operator.noise.gaussian:
        return f"{operator.sigma_y:g}"
    return f"Poisson {PHOTONS}"


def label(method: str, settings: Settings) -> str:
    """The method's name with its tuned settings (DPS's zeta, DiffPIR's lambda and eta)."""
    if method == "dps":
        return f"dps (ζ = {settings.get('dps_zeta', 1.0):g})"
    if method == "diffpir":
        return (f"diffpir (λ = {settings.get('diffpir_lam', 1.0):g}, "
                f"η = {settings.get('diffpir_eta', 0.0):g})")
    return method


def picture(task: str, operator: ForwardModel, results: dict[str, Restoration], to_display,  # type: ignore[no-untyped-def]
            cell: int = 48) -> Image.Image:
    """The first images of ``task``: the measurement (``y`` itself when it is an image of the
    data's shape, as for deblurring, where ``A^+ y`` is noise; else ``A^+ y``), one row per
    method, the truth."""
    first = next(iter(results.values()))
    k = min(PICTURE_COLUMNS, len(first.truth))
    if tuple(operator.measurement_shape) == tuple(operator.data_shape):
        shown, label = first.measurement[:k], "measurement y"
    else:
        shown, label = first.pseudo_inverse[:k], "measurement A^+ y"
    rows = [(label, to_display(shown.float()))]
    rows += [(name, to_display(r.samples[:k])) for name, r in results.items()]
    rows.append(("truth", to_display(first.truth[:k])))
    return labelled_grid(rows, title=f"{task}: {operator.describe()}", cell=cell)


def tune(task_name: str, diffusion, operator: ForwardModel, images: torch.Tensor,  # type: ignore[no-untyped-def]
         methods: list[str], batch_size: int) -> Settings:
    """Print the mean PSNR of every candidate DPS ``zeta`` and DiffPIR (``lam``, ``eta``) on
    the tuning images (measurement seed 0); return the best of each."""
    candidates: list[tuple[str, Settings]] = []
    if "dps" in methods:
        candidates += [("dps", {"dps_zeta": z}) for z in ZETAS]
    if "diffpir" in methods and operator.noise.gaussian:
        pairs = DIFFPIR if operator.sigma_y > 0 else tuple({(1.0, e) for _, e in DIFFPIR})
        candidates += [("diffpir", {"diffpir_lam": lam, "diffpir_eta": eta})
                       for lam, eta in sorted(pairs)]
    scores: dict[str, list[tuple[float, Settings]]] = {}
    for name, setting in candidates:
        term, solver = METHODS[name]
        r = restore(diffusion, term(operator, setting), images, solver(setting),
                    samples_per_image=1, seed=0, batch_size=batch_size)
        scores.setdefault(name, []).append((r.metrics["psnr"], setting))
        print(f"tune {task_name} {name} {setting}: PSNR {r.metrics['psnr']:.2f} "
              f"[{r.metrics['psnr_low']:.2f}, {r.metrics['psnr_high']:.2f}], consistency "
              f"{r.metrics['consistency']:.3g}", flush=True)
    chosen: Settings = {}
    for name, rows in scores.items():
        best = max(rows, key=lambda row: row[0])
        print(f"best {task_name} {name}: {best[1]} ({best[0]:.2f} dB)", flush=True)
        chosen |= best[1]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description="inverse-problem methods x tasks table")
    parser.add_argument("--root", default="runs", help="where the trained runs are")
    parser.add_argument("--n", type=int, default=100, help="held-out images per task")
    parser.add_argument("--offset", type=int, help="first held-out image (default 0; "
                        f"{TUNE_OFFSET}, the tuning split, with --tune)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--batch-size", type=int, default=100, help="restorations per batch")
    parser.add_argument("--out", type=Path, help="append each task's markdown rows here")
    parser.add_argument("--pictures", type=Path, help="write TASK.png per task into this folder")
    parser.add_argument("--tune", action="store_true",
                        help="sweep DPS's zeta and DiffPIR's lam / eta on the tuning split")
    parser.add_argument("--settings", type=Path,
                        help="JSON of per-task settings: --tune adds to it, the table reads it")
    args = parser.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    unknown = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown task or method {unknown}; tasks: {', '.join(TASKS)}; methods: "
                     f"{', '.join(METHODS)}")
    offset = args.offset if args.offset is not None else (TUNE_OFFSET if args.tune else 0)
    if not args.tune and offset < TUNE_OFFSET < offset + args.n:
        parser.error(f"held-out images {offset}..{offset + args.n - 1} overlap the tuning "
                     f"split from {TUNE_OFFSET}")
    torch.set_num_threads(1)
    root = Path(args.root)
    started = time.perf_counter()
    fd = None
    if not args.tune and any(TASKS[t].fd for t in tasks):
        fd = FrechetDistance(features=TrainedModel.resolve(str(root / "features_digits" /
                                                               "latest")))
    runs: dict[str, tuple] = {}
    tuned: dict[str, Settings] = {}
    if args.settings is not None and args.settings.exists():
        tuned = json.loads(args.settings.read_text(encoding="utf-8"))
    header = ["| task | method | PSNR (dB) | SSIM | consistency (noise) | FD | NFE | "
              "s / image |", "|---|---|---|---|---|---|---:|---:|"]
    if not args.tune:
        print("\n".join(header), flush=True)
        if args.out is not None and not args.out.exists():
            args.out.write_text("\n".join(header) + "\n", encoding="utf-8")

    for task_name in tasks:
        task = TASKS[task_name]
        if task.model not in runs:
            _, components = open_run(root / task.model / "latest")
            runs[task.model] = (components.diffusion, components.data, components.dataset)
        diffusion, data, dataset = runs[task.model]
        images = data.heldout[offset:offset + args.n].float()
        if len(images) < args.n:
            parser.error(f"{task_name}: only {len(images)} held-out images from {offset}")
        operator = get_registry().build("forward_model", dict(task.operator),
                                        data_shape=tuple(data.shape))
        if args.tune:
            tuned[task_name] = tune(task_name, diffusion, operator, images, methods,
                                    args.batch_size)
            if args.settings is not None:
                args.settings.write_text(json.dumps(tuned, indent=1), encoding="utf-8")
            continue
        task_fd = fd if task.fd else None
        noise = noise_cell(operator)
        settings = tuned.get(task_name, {})
        results: dict[str, Restoration] = {}
        lines: list[str] = []

        def emit(line: str, lines: list[str] = lines) -> None:
            lines.append(line)
            print(line, flush=True)

        # the baseline A^+ y, from the y every method sees (restore's measurement, seed 0)
        measurement = operator.simulate(images, torch.Generator().manual_seed(0))
        naive = operator.pinv(measurement.double())
        base = image_metrics(naive, images, operator, measurement)
        emit(f"| {task_name} | A^+ y | {interval(base, 'psnr', 2)} | "
             f"{interval(base, 'ssim', 3)} | {base['consistency']:.3g} ({noise}) | "
             f"{fd_cell(task_fd, naive, data)} | 0 | — |")
        for method_name in methods:
            term, solver = METHODS[method_name]
            try:
                r = restore(diffusion, term(operator, settings), images, solver(settings),
                            samples_per_image=1, seed=0, batch_size=args.batch_size)
            except ValueError as exc:  # a method that cannot run this task says why
                emit(f"| {task_name} | {method_name} | cannot run: {exc} | | | | | |")
                continue
            assert torch.equal(measurement, r.measurement), "one y per task"
            results[method_name] = r
            m = r.metrics
            emit(f"| {task_name} | {label(method_name, settings)} | {interval(m, 'psnr', 2)} | "
                 f"{interval(m, 'ssim', 3)} | {m['consistency']:.3g} ({noise}) | "
                 f"{fd_cell(task_fd, r.samples, data)} | {r.nfe} | "
                 f"{r.seconds / len(images):.3f} |")
        if args.out is not None:
            with args.out.open("a", encoding="utf-8") as file:
                file.write("\n".join(lines) + "\n")
        if args.pictures is not None and results:
            args.pictures.mkdir(parents=True, exist_ok=True)
            cell = 48 if data.shape[-1] <= 16 else 64  # 8x8 digits x6, 32x32 photographs x2
            picture(task_name, operator, results, dataset.to_display, cell).save(
                args.pictures / f"{task_name}.png")
    total = time.perf_counter() - started
    print(f"\n{args.n} images per task from held-out image {offset}; {total / 60:.1f} minutes "
          "in all", flush=True)


if __name__ == "__main__":
    main()
