"""First-order solvers at 5 / 10 / 20 NFE: which time grid, for data of which scale.

The three-mode mixture of ``benchmarks/solvers.py`` (exact score) scaled by 0.3, 1 and 3, on the
DDPM and VP processes; the RMS distance to a tight probability-flow solve (DPM-Solver++(3M),
1000 steps) from the same start noise, divided by the scale, N = 8,000, one seed. DDIM on its
uniform grid against Euler and Heun on the log-SNR default, the uniform and the quadratic grids.

    OMP_NUM_THREADS=1 python benchmarks/grid_scales.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_kit.model import ScoreModel
from diffusers_kit.processes import DDPM, VP
from diffusers_kit.solvers import DDIM, DPMSolver3M, EulerODE, HeunODE
from diffusers_kit.testing import ExactMixture, ExactScoreNetwork, three_modes

SOLVERS = {
    "ddim (uniform)": lambda k: DDIM(steps=k),
    "euler (log-snr)": lambda k: EulerODE(steps=k),
    "euler (uniform)": lambda k: EulerODE(steps=k, spacing="uniform"),
    "euler (quadratic)": lambda k: EulerODE(steps=k, spacing="quadratic"),
    "heun (log-snr)": lambda k: HeunODE(steps=(k + 1) // 2),
    "heun (uniform)": lambda k: HeunODE(steps=(k + 1) // 2, spacing="uniform"),
}


def main(n: int = 8000, budgets: tuple[int, ...] = (5, 10, 20)) -> None:
    base = three_modes()
    print("| process | data scale | " + " | ".join(SOLVERS) + " |")
    print("|---|---|" + "---|" * len(SOLVERS))
    for name, process in (("ddpm", DDPM()), ("vp", VP())):
        for scale in (0.3, 1.0, 3.0):
            mixture = ExactMixture(base.weights, base.means * scale, base.stds * scale)
            model = ScoreModel(process, ExactScoreNetwork(mixture, process))
            x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(100))
            reference = DPMSolver3M(steps=1000).sample(model, (n, 2), x_T=x_T).samples
            cells = []
            for make in SOLVERS.values():
                errors = []
                for k in budgets:
                    samples = make(k).sample(model, (n, 2), x_T=x_T).samples
                    errors.append(float((samples - reference).pow(2).mean().sqrt()) / scale)
                cells.append(" / ".join(f"{e:.3f}" for e in errors))
            print(f"| {name} | {scale:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
