"""Calibration of the distribution metrics' intervals (docs/evaluation.md, "Calibrated intervals").

Features N(0, I_d) for reference and real set, N(s, I_d) for the samples (s = 0: a perfect
generator). The truth is each statistic over 300 independent pairs of fresh sets; R data sets
give two intervals each (value and floor, the floor's real set drawn like the samples). Prints
the mean interval width over the true central 95 % spread and the share of intervals holding
the truth's mean.

    OMP_NUM_THREADS=1 python benchmarks/interval_calibration.py D SHIFT [R] [N] [RESAMPLES]
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from diffusers_kit.metrics.fd import frechet_distance
from diffusers_kit.metrics.floor import ErrorBars, RealSets, compare_with_floor
from diffusers_kit.metrics.kid import full_set_kid
from diffusers_kit.metrics.prdc import prdc

STATISTICS = {
    "fd": lambda a, b: {"fd": frechet_distance(a, b)},
    "kid": lambda a, b: {"kid": full_set_kid(a, b)},
    "prdc": lambda a, b: prdc(b, a),
}


def main(d: int, shift: float, replications: int = 40, n: int = 200, resamples: int = 100
         ) -> None:
    g = torch.Generator().manual_seed(0)

    def draw(s: float = 0.0) -> torch.Tensor:
        return torch.randn(n, d, generator=g, dtype=torch.float64) + s

    for name, statistic in STATISTICS.items():
        truth = [statistic(draw(shift), draw()) for _ in range(300)]
        values = {key: np.array([t[key] for t in truth]) for key in truth[0]}
        covered = dict.fromkeys(values, 0)
        widths: dict[str, list[float]] = {key: [] for key in values}
        for r in range(replications):
            sets = RealSets(draw(shift), draw(), draw(shift), n, torch.arange(n))
            out = compare_with_floor(name, statistic, sets, torch.Generator().manual_seed(r),
                                     ErrorBars(resamples, 0.95))
            for key, v in values.items():
                for role in ("", "_floor"):
                    low, high = out[f"{key}{role}_low"], out[f"{key}{role}_high"]
                    covered[key] += int(low <= v.mean() <= high)
                    widths[key].append(high - low)
        for key, v in values.items():
            spread = np.quantile(v, 0.975) - np.quantile(v, 0.025)
            print(f"d={d} shift={shift} {key:10s} width/spread {np.mean(widths[key]) / spread:.2f}"
                  f"  coverage {covered[key] / (2 * replications):.2f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), float(sys.argv[2]), *(int(a) for a in sys.argv[3:]))
