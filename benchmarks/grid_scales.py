"""Which time grid for which process and data scale: the evidence behind ``spacing: auto``.

The three-mode mixture of ``benchmarks/solvers.py`` (exact score) scaled by 0.3, 1 and 3, on
every built-in process; the RMS distance to a tight probability-flow solve from the same start
noise (:class:`diffusers_kit.testing.ODEReference`), divided by the scale, N = 4,000, one seed.
Euler, Heun, DPM-Solver++(2M) and UniPC on the ``log_snr`` and the ``quadratic`` grid, with
5-step DDIM (its uniform grid) as the baseline; cells are 5 / 10 / 20 NFE (Heun: 5 / 9 / 19).
The last column says which grid ``auto`` takes on that process.

    OMP_NUM_THREADS=1 python benchmarks/grid_scales.py            # every process (~6 min)
    OMP_NUM_THREADS=1 python benchmarks/grid_scales.py ddpm ve    # some of them
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_kit.model import ScoreModel
from diffusers_kit.processes import DDPM, OU, VE, VP, ConstantSigma, SubVP
from diffusers_kit.solvers import DDIM, DPMSolver2M, EulerODE, HeunODE, UniPC
from diffusers_kit.solvers.grids import resolve_spacing
from diffusers_kit.testing import ExactMixture, ExactScoreNetwork, ODEReference, three_modes

PROCESSES = {"ddpm": DDPM, "ddpm-cosine": lambda: DDPM(schedule="cosine"), "vp": VP,
             "subvp": SubVP, "ou": OU, "constant-sigma": ConstantSigma, "ve": VE}
SOLVERS = {
    "euler": lambda k, grid: EulerODE(steps=k, spacing=grid),
    "heun": lambda k, grid: HeunODE(steps=(k + 1) // 2, spacing=grid),
    "dpm_solver_2m": lambda k, grid: DPMSolver2M(steps=k, spacing=grid),
    "unipc": lambda k, grid: UniPC(steps=k, spacing=grid),
}
GRIDS = ("log_snr", "quadratic")
BUDGETS = (5, 10, 20)


def row(name: str, scale: float, n: int = 4000) -> list[str]:
    process = PROCESSES[name]()
    base = three_modes()
    mixture = ExactMixture(base.weights, base.means * scale, base.stds * scale)
    model = ScoreModel(process, ExactScoreNetwork(mixture, process))
    x_T = process.prior_std() * torch.randn(n, 2, generator=torch.Generator().manual_seed(100))
    reference = ODEReference(model, x_T, scale=scale)

    def cell(make) -> str:  # type: ignore[no-untyped-def]
        return " / ".join(f"{reference.error(make(k)):.3f}" for k in BUDGETS)

    cells = [cell(lambda k: DDIM(steps=k))]
    for make in SOLVERS.values():
        cells += [cell(lambda k, make=make, grid=grid: make(k, grid)) for grid in GRIDS]
    return [name, f"{scale:g}", *cells, resolve_spacing(process, "auto")]


def main(names: list[str]) -> None:
    header = ["process", "data scale", "ddim (uniform)"]
    header += [f"{solver} ({grid.replace('_', '-')})" for solver in SOLVERS for grid in GRIDS]
    header.append("auto")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in names:
        for scale in (0.3, 1.0, 3.0):
            print("| " + " | ".join(row(name, scale)) + " |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:] or list(PROCESSES))
