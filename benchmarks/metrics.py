"""Time every sample metric on 360 digits (CPU, one thread): the budget is 10 s in all.

    OMP_NUM_THREADS=1 python benchmarks/metrics.py [--root runs]

The feature network is specs/features_digits.yaml, built under --root once (about a minute)
and reused afterwards; its build is not part of the timing. The "samples" are 360 training
digits with a little noise (the metrics' cost does not depend on what the samples look like).
Results are recorded in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffusers_kit.metrics import (
    ClassAccuracy,
    FrechetDistance,
    KernelDistance,
    PrecisionRecall,
    SlicedWasserstein,
)
from diffusers_kit.pipeline import TrainedModel

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description="time every sample metric on 360 digits")
    parser.add_argument("--root", default="runs", help="where the feature network is built")
    parser.add_argument("--n", type=int, default=360)
    args = parser.parse_args()
    torch.set_num_threads(1)
    features = TrainedModel.resolve(ROOT / "specs" / "features_digits.yaml", root=args.root)
    data = features.data()
    g = torch.Generator().manual_seed(0)
    samples = data.train[:args.n] + 0.05 * torch.randn(args.n, *data.shape, generator=g)
    metrics = [("swd", SlicedWasserstein()), ("fd", FrechetDistance(features)),
               ("kid", KernelDistance(features)), ("prdc", PrecisionRecall(features)),
               ("class_accuracy", ClassAccuracy(features))]
    total = 0.0
    print(f"{'metric':16s} {'seconds':>8s}  figures")
    for name, metric in metrics:
        started = time.perf_counter()
        out = metric.evaluate(samples, data, torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - started
        total += seconds
        head = [k for k in out if not k.endswith(("_low", "_high", "_n", "_std"))][:4]
        print(f"{name:16s} {seconds:8.2f}  " + ", ".join(f"{k} {out[k]:.4g}" for k in head))
    print(f"{'all':16s} {total:8.2f}  ({args.n} samples; held-out n = {len(data.heldout)})")


if __name__ == "__main__":
    main()
