"""Every deterministic solver converges at the order its docstring claims.

The target is a two-mode Gaussian mixture with an exact score (:func:`overlapping_modes`), on
which the probability-flow map is smooth, so the global error follows ``C h^p`` from a few dozen
steps on (on the three-mode target a few start points lie near the boundary between modes and
change mode between resolutions, which hides the order below ~100 NFE). The order is observed
by successive refinement: ``d(n) = RMS(x_n - x_2n)``, the change of the samples from ``n`` grid
points to ``2n`` from the same start noise, is ``(1 - 2^-p) C h^p`` to leading order, so the
least-squares slope of ``-log d`` against ``log NFE`` over a window of ``n`` must lie within
``TOLERANCE`` (0.3) of the claimed ``p``. No reference solve enters the slope. The start noise
is float64, so every run (and ``ODEReference``) keeps its state in float64; the windows were
chosen when the state was float32, where ``d(n)`` (at most 128 grid points) stays 10x or more
above the solvers' own rounding (~1e-6), and the slopes below hold in both. That the limit is the
probability-flow solution is checked apart: the error to ``ODEReference`` at the window's
first ``n`` is ``d(n) / (1 - 2^-p)`` within a third (measured ratios 0.94-1.01).

Grids and windows. Equal log-SNR steps (``lambda = -log varsigma``, the variable the
exponential integrators state their orders in) on DDPM (linear, T = 1000), VP and VE; every
window starts at 16 grid points, above the 15 below which ``lower_order_final`` lowers the last
orders. On DDPM a window ends at 32 points: beyond, the log-SNR grid asks for points between
the chain's first steps and they merge (48 points give 47 NFE, 64 give 62), so the grid no
longer refines near ``t_min`` and the slope wanders (DPM-Solver++(3M) 3.4-3.5 over 24-64).
Measured slopes (N = 256, seed 0; DDPM / VP / VE): Euler and DDIM 1.00 / 1.00 / 1.01, Heun
1.91 / 1.90 / 1.96 (``edm_stochastic`` with ``S_churn: 0`` the same), Heun's ``noise`` form
2.26 / 2.26 / 2.22 (from above), DPM-Solver++(2M) 1.94 / 1.98 / 2.04, DPM-Solver++(3M) 3.09 /
3.19 / 3.18; UniPC with the corrector, order 1 / 2 / 3: 1.97-2.03, 2.94-3.01, 3.85-4.02;
without it the predictor's order (order 3's predictor gives DPM-Solver++(3M)'s figures).
Before the ``D_2`` weight was fixed (deaff36), DPM-Solver++(3M) read 2.67 / 2.47 / 2.37 here
and failed. On the ``quadratic`` grid (VP's default) the one-step methods keep their orders
(Euler 1.02, Heun 1.87, UniPC-1 2.00) but the multistep ones read faster than their order over
16-64 NFE (VP: 2M 2.36, 3M 3.57, UniPC-3 4.60; DDPM alike), so only the one-step methods are
checked there. ``scipy_ode`` is adaptive: its test checks that a tighter tolerance buys a smaller
error instead.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from diffusers_kit import Diffusion
from diffusers_kit.processes import DDPM, VE, VP
from diffusers_kit.registry import get_registry
from diffusers_kit.testing import ExactScoreNetwork, ODEReference
from tests.gaussian_mixture import overlapping_modes

N = 256
TOLERANCE = 0.3
MIXTURE = overlapping_modes()

# each process and the most grid points a window may use
PROCESSES = {
    "ddpm": (DDPM, 32),
    "vp": (VP, 64),
    "ve": (lambda: VE(sigma_min=0.01, sigma_max=20.0), 64),  # sigma_max above the data's spread
}

# (kind, settings, the order its docstring claims, grid points n of the window: d(n) uses 2n)
LOW = (16, 24, 32, 48)
THIRD = (16, 24, 32, 48, 64)
FOURTH = LOW
CASES = [
    ("euler", {}, 1, LOW),
    ("ddim", {"eta": 0.0}, 1, LOW),
    ("heun", {}, 2, (8, 12, 16, 24)),
    ("heun", {"form": "noise"}, 2, (12, 16, 24, 32)),
    ("edm_stochastic", {"S_churn": 0.0}, 2, (8, 12, 16, 24)),
    ("dpm_solver_2m", {}, 2, LOW),
    ("dpm_solver_3m", {}, 3, THIRD),
    ("unipc", {"order": 1}, 2, LOW),
    ("unipc", {"order": 2}, 3, THIRD),
    ("unipc", {"order": 3}, 4, FOURTH),
    ("unipc", {"order": 2, "corrector": False}, 2, LOW),
    ("unipc", {"order": 3, "corrector": False}, 3, THIRD),
]


def _label(case: tuple) -> str:
    kind, settings, order, _ = case
    extra = ",".join(f"{k}={v}" for k, v in settings.items())
    return f"{kind}[{extra}]-p{order}" if extra else f"{kind}-p{order}"


@functools.cache
def _setting(name: str) -> tuple[Diffusion, torch.Tensor, ODEReference, int]:
    make, most = PROCESSES[name]
    process = make()
    diffusion = Diffusion(process, ExactScoreNetwork(MIXTURE, process), device="cpu")
    x_T = process.prior_std() * torch.randn(N, MIXTURE.dim, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(0))
    return diffusion, x_T, ODEReference(diffusion.model, x_T), most


@pytest.fixture(params=list(PROCESSES))
def setting(request):  # type: ignore[no-untyped-def]
    """The exact model on one process, a start noise, the reference solve from it and the
    most grid points a window may use there."""
    return _setting(request.param)


@pytest.fixture
def setting_for():  # type: ignore[no-untyped-def]
    return _setting


def solver(kind: str, settings: dict, points: int, spacing: str):  # type: ignore[no-untyped-def]
    """The solver ``kind`` with ``points`` grid points (Heun-type: ``steps`` counts them)."""
    return get_registry().build("solver", {"kind": kind, "steps": points, "spacing": spacing,
                                           **settings})


def observed_order(diffusion: Diffusion, x_T: torch.Tensor, kind: str, settings: dict,
                   window: tuple[int, ...], spacing: str = "log_snr"
                   ) -> tuple[float, list[tuple[int, float]], dict[int, torch.Tensor]]:
    """The least-squares slope of ``-log d(n)`` against ``log NFE(n)`` over ``window``, the
    points ``(NFE(n), d(n))`` and the samples by grid points."""
    samples, nfe = {}, {}
    for points in sorted({*window, *(2 * n for n in window)}):
        result = diffusion.sample(len(x_T), solver(kind, settings, points, spacing), x_T=x_T)
        samples[points], nfe[points] = result.samples.double(), result.nfe
    curve = [(nfe[n], float((samples[n] - samples[2 * n]).pow(2).mean().sqrt()))
             for n in window]
    xs = [math.log(n) for n, _ in curve]
    ys = [math.log(d) for _, d in curve]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = -sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    return slope, curve, samples


@pytest.mark.parametrize(("kind", "settings", "order", "window"), CASES,
                         ids=[_label(c) for c in CASES])
def test_order_on_equal_log_snr_steps(setting, kind, settings, order, window):
    diffusion, x_T, reference, most = setting
    window = tuple(n for n in window if n <= most)
    slope, curve, samples = observed_order(diffusion, x_T, kind, settings, window)
    assert abs(slope - order) <= TOLERANCE, (
        f"{kind} {settings}: observed order {slope:.2f}, claimed {order}; (NFE, d) = {curve}")
    first = window[0]
    predicted = curve[0][1] / (1 - 2.0**-order)
    error = reference.distance(samples[first].float())
    assert 0.75 < error / predicted < 1.33, (
        f"{kind} {settings}: error to the reference {error:.2e} at {first} points, "
        f"refinement predicts {predicted:.2e}: the limit is not the probability-flow solution")


# the one-step methods: their order holds on any smooth grid at these NFE; the multistep ones
# read faster than their order on the quadratic grid over 16-64 NFE (see the module doc)
ONE_STEP = [c for c in CASES if c[0] in ("euler", "ddim", "heun", "edm_stochastic")
            or (c[0] == "unipc" and c[1] == {"order": 1})]


@pytest.mark.parametrize(("kind", "settings", "order", "window"), ONE_STEP,
                         ids=[_label(c) for c in ONE_STEP])
def test_one_step_orders_on_the_quadratic_grid(kind, settings, order, window):
    """VP's default grid (``quadratic``, DDIM's): VP rather than DDPM, whose 1000-step chain
    merges the quadratic grid's points near t_min from 32 points on."""
    process = VP()
    diffusion = Diffusion(process, ExactScoreNetwork(MIXTURE, process), device="cpu")
    x_T = torch.randn(N, MIXTURE.dim, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0))
    slope, curve, _ = observed_order(diffusion, x_T, kind, settings, window, "quadratic")
    assert abs(slope - order) <= TOLERANCE, (
        f"{kind} {settings}: observed order {slope:.2f}, claimed {order}; (NFE, d) = {curve}")


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_scipy_ode_error_follows_its_tolerance(setting_for, process):
    """``scipy_ode`` is adaptive: a tolerance ten times tighter (rtol = atol, RK45) cuts the
    error to the reference at least three times, from 1e-2 to 1e-4 (measured: VP 4.9e-3 /
    6.5e-4 / 1.3e-4, VE 3.1e-2 / 1.9e-3 / 9.2e-5), and takes more evaluations. Tighter than
    1e-5 the reference's own float32 rounding (~1e-5) is reached."""
    diffusion, x_T, reference, _ = setting_for(process)
    runs = [diffusion.sample(len(x_T), get_registry().build(
        "solver", {"kind": "scipy_ode", "rtol": tol, "atol": tol}), x_T=x_T)
        for tol in (1e-2, 1e-3, 1e-4)]
    errors = [reference.distance(run.samples) for run in runs]
    for loose, tight in itertools.pairwise(errors):
        assert tight < loose / 3, errors
    assert runs[0].nfe < runs[1].nfe < runs[2].nfe, [run.nfe for run in runs]


def test_float64_runs_stay_float64_and_converge_below_float32_rounding():
    """A float64 ``x_T`` makes a float64 run: the state, the times and the network's inputs
    (the grid's cached scalars and time vectors follow the state's dtype), and the samples.
    DPM-Solver++(3M) on VP's log-SNR grid then keeps its third order where float32 stalls at
    its rounding: d(256) / d(512) measured 8.0 in float64 (4.9e-7 -> 6.1e-8) and 0.73 in
    float32 (7.4e-7 -> 1.0e-6)."""
    process = VP()
    network = ExactScoreNetwork(MIXTURE, process)
    seen: set[torch.dtype] = set()
    network.register_forward_pre_hook(lambda _, args: seen.update(a.dtype for a in args))
    diffusion = Diffusion(process, network, device="cpu")
    x_T = torch.randn(N, MIXTURE.dim, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0))
    d = {}
    for dtype in (torch.float32, torch.float64):
        seen.clear()
        runs = {n: diffusion.sample(N, solver("dpm_solver_3m", {}, n, "log_snr"),
                                    x_T=x_T.to(dtype)).samples for n in (256, 512, 1024)}
        assert seen == {dtype} and {r.dtype for r in runs.values()} == {dtype}, seen
        d[dtype] = [float((runs[n] - runs[2 * n]).double().pow(2).mean().sqrt())
                    for n in (256, 512)]
    assert d[torch.float64][1] < d[torch.float64][0] / 5, d  # third order: 8x
    assert d[torch.float32][1] > d[torch.float32][0] / 2, d  # the float32 floor
    assert d[torch.float64][1] < d[torch.float32][1] / 5, d
