"""Sample quality against network evaluations for every solver, on the analytic target.

The target is the three-mode 2-D Gaussian mixture of ``tests/gaussian_mixture.py``, whose noised
marginals have an exact score, so every number here measures the solver alone. Quality is the
sliced Wasserstein distance (SWD) to fresh exact samples, divided by the noise floor (the SWD
between two exact sample sets of the same size, averaged over 5 pairs): 1.0 is as good as exact
sampling can be judged with this many samples.

Also measured: the scipy probability-flow ODE's NFE at rtol = atol = 1e-5; the deterministic
solvers' error against a tight solve of the probability-flow ODE from the same start noise (RMS
over N = 20,000 samples, 3 seeds), side by side with diffusers' schedulers and k-diffusion's
samplers on the same exact score, in the same process (DDPM linear schedule); and each
sampler's overhead outside the network at N = 64 against a hand-written loop.

diffusers and k-diffusion are benchmark-only extras, never needed by dkit or its tests:
``pip install -e .[bench]`` for diffusers and ``pip install --no-deps k-diffusion`` (its
package ``__init__`` imports torchvision and its training code, and its requirements pull a
CUDA torch; only ``k_diffusion/sampling.py`` is loaded here, see :func:`k_diffusion_sampling`).
A library that is not installed is left out of the tables.

    OMP_NUM_THREADS=1 python benchmarks/solvers.py          # writes docs/solvers_benchmark.md + PNG
    OMP_NUM_THREADS=1 python benchmarks/solvers.py --keep-overhead  # the same, overhead table
                                                            # carried over from the page (timings
                                                            # taken on a quiet machine)
    OMP_NUM_THREADS=1 python benchmarks/solvers.py --only errors     # one part, printed only
    OMP_NUM_THREADS=1 python benchmarks/solvers.py --only public [--compile-noise]
                                         # stochastic samplers through Diffusion.sample
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import sys
import time
import types
from pathlib import Path
from unittest import mock

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_kit.metrics.swd import random_directions, sliced_wasserstein  # noqa: E402
from diffusers_kit.model import ScoreModel  # noqa: E402
from diffusers_kit.networks.base import Network  # noqa: E402
from diffusers_kit.processes import DDPM, VP  # noqa: E402
from diffusers_kit.solvers import (  # noqa: E402
    DDIM,
    Ancestral,
    AncestralPredictor,
    DPMSolver2M,
    DPMSolver3M,
    EDMStochastic,
    EulerMaruyama,
    EulerODE,
    HeunODE,
    LangevinCorrector,
    PredictorCorrector,
    ScipyODE,
    UniPC,
)
from diffusers_kit.solvers.tuning import reference_solution, tune_times  # noqa: E402
from diffusers_kit.testing import ODEReference  # noqa: E402
from tests.gaussian_mixture import exact_model, three_modes  # noqa: E402

N = 4000
SEED = 0
MIXTURE = three_modes()
DIRECTIONS = random_directions(2, 256, torch.Generator().manual_seed(1))
GEN = torch.Generator().manual_seed(2)
REFERENCE = MIXTURE.sample(N, GEN)
FLOOR = sum(sliced_wasserstein(MIXTURE.sample(N, GEN), REFERENCE, DIRECTIONS)
            for _ in range(5)) / 5


def quality(solver, process) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    model = exact_model(MIXTURE, process)
    result = solver.sample(model, (N, 2), generator=torch.Generator().manual_seed(SEED))
    return result.nfe, sliced_wasserstein(result.samples, REFERENCE, DIRECTIONS) / FLOOR


SWEEPS = {
    "ancestral (DDPM, beta~)": (lambda k: Ancestral(steps=k), DDPM, [10, 20, 50, 100, 250, 1000]),
    "ddim eta=0 (DDPM)": (lambda k: DDIM(steps=k), DDPM, [5, 10, 20, 50, 100]),
    "pc: euler-maruyama (VP)": (lambda k: PredictorCorrector(EulerMaruyama(), steps=k), VP,
                                [20, 50, 100, 250, 1000]),
    "pc: reverse diffusion + langevin (VP)": (
        lambda k: PredictorCorrector(corrector=LangevinCorrector(), steps=k), VP,
        [10, 25, 50, 125, 500]),
    "euler, default grid (VP)": (lambda k: EulerODE(steps=k), VP, [5, 10, 20, 50, 100]),
    "heun, default grid (VP)": (lambda k: HeunODE(steps=k), VP, [3, 5, 8, 10, 18]),
    "dpm-solver++(2m), default grid (VP)": (lambda k: DPMSolver2M(steps=k), VP,
                                            [5, 8, 10, 15, 20]),
    "dpm-solver++(3m), default grid (VP)": (lambda k: DPMSolver3M(steps=k), VP,
                                            [5, 8, 10, 15, 20]),
    "unipc (order 2), default grid (VP)": (lambda k: UniPC(steps=k), VP, [5, 8, 10, 15, 20]),
    "edm stochastic, S_churn=30 (VP)": (lambda k: EDMStochastic(steps=k), VP, [5, 10, 20, 40]),
    "scipy RK45, rtol=atol (VP)": (lambda k: ScipyODE(rtol=10.0**-k, atol=10.0**-k), VP,
                                   [2, 3, 4, 5]),
}


def diffusers_version() -> str:
    try:
        import diffusers
    except ImportError:
        return "not installed"
    return diffusers.__version__


class Free(Network):
    """A network that costs (almost) nothing: the time left is the sampler's own."""

    def __init__(self) -> None:
        super().__init__("eps")
        self.data_shape = (2,)

    def forward(self, x, t):  # type: ignore[no-untyped-def]
        return x


class Timed(Network):
    """A network that costs (almost) nothing and counts the time spent in it."""

    def __init__(self) -> None:
        super().__init__("eps")
        self.data_shape = (2,)
        self.seconds = 0.0

    def forward(self, x, t):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = x * 0.5
        self.seconds += time.perf_counter() - start
        return out


ROUNDS = 100


def interleaved(loops: dict, network: Timed, rounds: int, baseline: str
                ) -> list[tuple[str, float, float]]:
    """``(name, seconds, seconds / baseline's)`` per loop: the best of ``rounds`` in which every
    loop runs once in turn, less the time ``network`` counted inside it."""
    best = dict.fromkeys(loops, math.inf)
    for _ in range(rounds):
        for name, fn in loops.items():
            network.seconds = 0.0
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start - network.seconds)
    return [(name, seconds, seconds / best[baseline]) for name, seconds in best.items()]


def overhead(n: int = 64, steps: int = 20, rounds: int = ROUNDS
             ) -> list[tuple[str, float, float]]:
    """Seconds per ``sample()`` call outside the network (a free network whose own time is
    subtracted), for each sampler with ``steps`` evaluations, against a hand-written DDIM loop
    with precomputed float coefficients, and against diffusers' schedulers (their own loop).

    Every loop runs once per round, in turn, and keeps its best round: on a shared machine a
    burst of load then costs every loop a round alike instead of falling on whichever loop was
    being timed (the ratios of separate best-of-k runs drifted by ~20 % between runs)."""
    process = DDPM()
    network = Timed()
    model = ScoreModel(process, network)

    from diffusers_kit.solvers.grids import sampling_times

    times = sampling_times(process, steps)
    alpha, sigma = process.marginal(times)
    a_t, s_t = alpha[:-1].tolist(), sigma[:-1].tolist()
    a_s, s_s = alpha[1:].tolist(), sigma[1:].tolist()
    t_rows = times[:-1].float()

    def hand_ddim() -> None:
        x = torch.randn(n, 2)
        for i in range(steps):
            eps = network(x, t_rows[i].expand(n))
            x0 = (x - s_t[i] * eps) / a_t[i]
            x = a_s[i] * x0 + s_s[i] * eps

    loops = {"hand-written DDIM loop": hand_ddim}
    solvers = {
        "ddim": DDIM(steps=steps), "ancestral": Ancestral(steps=steps),
        "euler": EulerODE(steps=steps), "heun": HeunODE(steps=steps // 2),
        "dpm_solver_2m": DPMSolver2M(steps=steps), "dpm_solver_3m": DPMSolver3M(steps=steps),
        "unipc": UniPC(steps=steps),
        "edm_stochastic": EDMStochastic(steps=steps // 2),
        "predictor_corrector (ancestral + langevin)": PredictorCorrector(
            AncestralPredictor(), LangevinCorrector(), steps=steps // 2),
    }
    for name, solver in solvers.items():
        loops[name] = lambda s=solver: s.sample(model, (n, 2))
    try:
        schedulers = diffusers_schedulers()
    except ImportError:
        schedulers = {}
    for name, make in schedulers.items():
        loops[f"diffusers {name}"] = lambda m=make: diffusers_sample(m(), network,
                                                                     torch.randn(n, 2), steps)
    return interleaved(loops, network, rounds, "hand-written DDIM loop")


def public_overhead(n: int = 64, steps: int = 20, rounds: int = ROUNDS, fused: bool = False
                    ) -> list[tuple[str, float, float]]:
    """The issue's definition of the stochastic samplers' overhead: seconds per call outside
    the network (a nearly free network whose own time is subtracted) of ``Diffusion.sample``
    (the public API: per-sample Philox streams, batching, recording, NFE counting) with
    ``steps`` evaluations, against a hand-written ancestral DDPM loop on the same grid that
    draws with ``torch.randn``. Interleaved rounds, best of ``rounds`` (see :func:`overhead`).
    ``fused``: each sampler again with ``DKIT_COMPILE_NOISE=1`` (the compiled Philox kernel)."""
    from diffusers_kit import Diffusion
    from diffusers_kit.solvers import noise
    from diffusers_kit.solvers.grids import sampling_times

    process = DDPM()
    network = Timed()
    diffusion = Diffusion(process, network, device="cpu")
    times = sampling_times(process, steps)
    alpha, sigma = process.marginal(times)
    sigma[-1] = 0.0
    a_t, s_t, a_s, s_s = (v.tolist() for v in (alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]))
    # q(x_s | x_t, x0) (Ho et al. 2020, eq. 7 between any two grid points)
    rows = []
    for i in range(len(a_t)):
        a_ts = a_t[i] / a_s[i]
        var_ts = s_t[i] ** 2 - a_ts**2 * s_s[i] ** 2
        rows.append((a_ts * s_s[i] ** 2 / s_t[i] ** 2, a_s[i] * var_ts / s_t[i] ** 2,
                     (var_ts * s_s[i] ** 2) ** 0.5 / s_t[i]))
    t_rows = times[:-1].float()

    def hand_ancestral() -> None:
        x = torch.randn(n, 2)
        for i, (c_x, c_0, std) in enumerate(rows):
            eps = network(x, t_rows[i].expand(n))
            x0 = (x - s_t[i] * eps) / a_t[i]
            x = c_x * x + c_0 * x0
            if std > 0:
                x = x + std * torch.randn(n, 2)

    loops = {"hand-written ancestral loop (torch.randn)": hand_ancestral}
    solvers = {
        "ancestral": Ancestral(steps=steps),
        "edm_stochastic (S_churn 30)": EDMStochastic(steps=steps // 2, S_churn=30.0),
        "predictor_corrector (ancestral + langevin)": PredictorCorrector(
            AncestralPredictor(), LangevinCorrector(), steps=steps // 2),
    }
    for name, solver in solvers.items():
        loops[f"Diffusion.sample: {name}"] = lambda s=solver: diffusion.sample(n, s, seed=1)

    def unfloored() -> None:  # draws computed ahead 1, 4, 16, ... at a time, as before the floor
        with mock.patch.object(noise, "LEAST_ELEMENTS", 1):
            diffusion.sample(n, solvers["ancestral"], seed=1)

    loops["Diffusion.sample: ancestral, no 2^12-number floor on computed-ahead draws"] = unfloored
    if fused:  # the same draws through the compiled Philox kernel (compiled before timing)
        compiled = {"DKIT_COMPILE_NOISE": "1"}
        for name, solver in solvers.items():
            def run(s=solver) -> None:  # type: ignore[no-untyped-def]
                with mock.patch.dict("os.environ", compiled):
                    diffusion.sample(n, s, seed=1)
            run()
            loops[f"Diffusion.sample: {name}, DKIT_COMPILE_NOISE=1"] = run
    return interleaved(loops, network, rounds, "hand-written ancestral loop (torch.randn)")


def diffusers_schedulers() -> dict:
    """diffusers' schedulers for the DDPM linear schedule (their defaults otherwise)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    return {
        "DDIM": DDIMScheduler,
        "DDIM (trailing)": lambda: DDIMScheduler(timestep_spacing="trailing"),
        "DPM++2M": DPMSolverMultistepScheduler,
        "DPM++3M": lambda: DPMSolverMultistepScheduler(solver_order=3),
        "UniPC": UniPCMultistepScheduler,
        "Euler": EulerDiscreteScheduler,
        "Heun": HeunDiscreteScheduler,
    }


def diffusers_sample(scheduler, network, x_T: torch.Tensor, nfe: int) -> tuple:  # type: ignore[no-untyped-def]
    """diffusers' sampling loop; its timestep ``k`` is dkit's DDPM time ``(k + 1) / T``
    (``alphas_cumprod[k]`` is dkit's ``abar_{k+1}``). Returns (samples, true NFE)."""
    steps = (nfe + 1) // 2 if "Heun" in type(scheduler).__name__ else nfe
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    count = 0
    n = x.shape[0]
    for k in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, k)
        t = torch.full((n,), (float(k) + 1.0) / 1000.0)
        eps = network(model_input, t)
        count += 1
        x = scheduler.step(eps, k, x).prev_sample
    return x, count


def k_diffusion_sampling() -> types.ModuleType:
    """``k_diffusion.sampling`` without the rest of the package (``pip install --no-deps
    k-diffusion``). The package's ``__init__`` imports every submodule, among them ``utils``
    (torchvision) and the training code; ``sampling.py`` itself needs only ``utils.append_dims``
    from the package, and ``torchsde`` / ``torchdiffeq`` (imported at its top) only for its
    Brownian-tree noise and its likelihood, which the deterministic samplers never call. So the
    file is executed as the module ``k_diffusion.sampling`` of a bare package whose ``utils``
    holds that one helper, with empty stand-ins for ``torchsde`` / ``torchdiffeq`` when they are
    not installed; ``sys.modules`` is restored afterwards. Raises ImportError without
    k-diffusion."""
    spec = importlib.util.find_spec("k_diffusion")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion")
    folder = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, dims: x.reshape(*x.shape, *([1] * (dims - x.ndim)))
    package.utils = utils
    stand_ins = {"k_diffusion": package, "k_diffusion.utils": utils}
    for name in ("torchsde", "torchdiffeq"):
        if importlib.util.find_spec(name) is None:
            stand_ins[name] = types.ModuleType(name)
    if "torchdiffeq" in stand_ins:
        stand_ins["torchdiffeq"].odeint = None  # sampling.py: from torchdiffeq import odeint
    module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling",
                                                         folder / "sampling.py")
    module = importlib.util.module_from_spec(module_spec)
    with mock.patch.dict(sys.modules, {**stand_ins, "k_diffusion.sampling": module}):
        module_spec.loader.exec_module(module)
    return module


def k_diffusion_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("k-diffusion")
    except PackageNotFoundError:
        return "not installed"


# k-diffusion's samplers: (function name, evaluations per step but the last, settings); the
# SDE ones with eta = 0 are their ODE limits (DPM++ 2M SDE: the midpoint form, = DPM++ 2M)
K_SAMPLERS = {
    "euler": ("sample_euler", 1, {}),
    "heun": ("sample_heun", 2, {}),
    "dpm_2": ("sample_dpm_2", 2, {}),
    "lms": ("sample_lms", 1, {}),
    "dpmpp_2m": ("sample_dpmpp_2m", 1, {}),
    "dpmpp_2m_sde eta=0": ("sample_dpmpp_2m_sde", 1, {"eta": 0.0}),
    "dpmpp_3m_sde eta=0": ("sample_dpmpp_3m_sde", 1, {"eta": 0.0}),
}


def k_diffusion_runs(process) -> dict:  # type: ignore[no-untyped-def]
    """``name -> run(x_T, nfe) -> (samples, true NFE)`` for every k-diffusion sampler on its
    ``karras`` (rho = 7) and ``exponential`` grids between the process's smallest and largest
    noise levels ``varsigma = sigma / alpha`` (DDPM: its first and last step). k-diffusion works
    in ``y = x / alpha`` against ``varsigma`` with a denoiser ``D(y, varsigma)``; the exact one
    is ``y + varsigma^2 grad log p(y; varsigma)``, the mixture's score at ``alpha = 1``,
    ``sigma = varsigma`` (the same exact score as dkit's network, which depends on ``t`` only
    through ``varsigma``), formed in float64 as dkit's is. It starts from ``x_T / alpha(1)``, as
    dkit and diffusers' Euler do (``sqrt(1 + varsigma_max^2) x_T``)."""
    sampling = k_diffusion_sampling()
    alpha, sigma = process.marginal(torch.tensor([1.0, process.t_min], dtype=torch.float64))
    level_max, level_min = (sigma / alpha).tolist()

    def denoiser(counter: list[int]):  # type: ignore[no-untyped-def]
        def denoise(y: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
            counter[0] += 1
            s = level.double()
            score = MIXTURE.score(y.double(), torch.ones_like(s), s).double()
            return (y.double() + s[:, None] ** 2 * score).to(y.dtype)
        return denoise

    grids = {
        "karras": lambda n: sampling.get_sigmas_karras(n, level_min, level_max, rho=7.0),
        "exponential": lambda n: sampling.get_sigmas_exponential(n, level_min, level_max),
    }
    runs = {}
    for name, (function, per_step, settings) in K_SAMPLERS.items():
        for grid, sigmas_of in grids.items():
            def run(x_T: torch.Tensor, nfe: int, function=function, per_step=per_step,
                    settings=settings, sigmas_of=sigmas_of) -> tuple[torch.Tensor, int]:
                steps = (nfe + 1) // 2 if per_step == 2 else nfe  # the last step: one
                sigmas = sigmas_of(steps).float()
                counter = [0]
                x = x_T * math.sqrt(1.0 + level_max**2)
                extra = {"noise_sampler": lambda *_: None} if "eta" in settings else {}
                out = getattr(sampling, function)(denoiser(counter), x, sigmas, disable=True,
                                                  **settings, **extra)
                return out, counter[0]
            runs[f"k-diffusion {name} ({grid})"] = run
    return runs


BUDGETS = (5, 10, 20, 50)
SWEEP = tuple(range(5, 21))  # the NFE to reach TARGET_ERROR is read off these
TARGET_ERROR = 0.03
CALIBRATION, CALIBRATION_SEED = 2000, 7  # the tuned rows' calibration draws


def ode_errors(n: int = 20000, seeds: tuple[int, ...] = (0, 1, 2),
               budgets: tuple[int, ...] = tuple(sorted({*SWEEP, *BUDGETS}))
               ) -> dict[str, dict[int, tuple[int, float]]]:
    """RMS distance (per coordinate, mean over seeds) to the probability-flow ODE solved tightly
    (``ODEReference``) from the same start noise, on DDPM linear, at each NFE budget: dkit's
    solvers, diffusers' schedulers and k-diffusion's samplers (those installed)."""
    process = DDPM()
    model = exact_model(MIXTURE, process)
    ours = {
        "ddim (uniform)": lambda k: DDIM(steps=k),
        "ddim (log-snr)": lambda k: DDIM(steps=k, spacing="log_snr"),
        "euler": lambda k: EulerODE(steps=k),
        "euler (log-snr)": lambda k: EulerODE(steps=k, spacing="log_snr"),
        "heun": lambda k: HeunODE(steps=(k + 1) // 2),
        "heun (log-snr)": lambda k: HeunODE(steps=(k + 1) // 2, spacing="log_snr"),
        "dpm_solver_2m": lambda k: DPMSolver2M(steps=k),
        "dpm_solver_2m (log-snr)": lambda k: DPMSolver2M(steps=k, spacing="log_snr"),
        "dpm_solver_2m (edm grid)": lambda k: DPMSolver2M(steps=k, spacing="edm"),
        "dpm_solver_3m": lambda k: DPMSolver3M(steps=k),
        "dpm_solver_3m (log-snr)": lambda k: DPMSolver3M(steps=k, spacing="log_snr"),
        "unipc": lambda k: UniPC(steps=k),
        "unipc (log-snr)": lambda k: UniPC(steps=k, spacing="log_snr"),
        "unipc order 3": lambda k: UniPC(steps=k, order=3),
        "unipc order 3 (log-snr)": lambda k: UniPC(steps=k, order=3, spacing="log_snr"),
        "unipc (power 2.5)": lambda k: UniPC(steps=k, spacing="power", rho=2.5),
        "unipc order 3 (power 2.5)": lambda k: UniPC(steps=k, order=3, spacing="power", rho=2.5),
        "dpm_solver_3m (power 2.5)": lambda k: DPMSolver3M(steps=k, spacing="power", rho=2.5),
        "dpm_solver_3m (log-snr, lower_order_final off)": lambda k: DPMSolver3M(
            steps=k, spacing="log_snr", lower_order_final=False),
        "unipc order 3 (log-snr, lower_order_final off)": lambda k: UniPC(
            steps=k, order=3, spacing="log_snr", lower_order_final=False),
    }
    calibration = torch.randn(CALIBRATION, 2, generator=torch.Generator().manual_seed(
        CALIBRATION_SEED))  # never one of the seeds measured
    calibration_reference = reference_solution(model, calibration)
    found: dict = {}

    def tuned(make):  # type: ignore[no-untyped-def]
        def build(k: int):  # type: ignore[no-untyped-def]
            if (make, k) not in found:  # once per budget, for all seeds
                found[make, k] = tune_times(model, make(k), calibration,
                                            reference=calibration_reference).solver
            return found[make, k]
        return build

    ours["unipc (tuned times)"] = tuned(lambda k: UniPC(steps=k))
    ours["unipc order 3 (tuned times)"] = tuned(lambda k: UniPC(steps=k, order=3))
    theirs: dict = {}
    with contextlib.suppress(ImportError):
        for name, make in diffusers_schedulers().items():
            theirs[name] = lambda x_T, k, make=make: diffusers_sample(make(), model.network,
                                                                       x_T, k)
    with contextlib.suppress(ImportError):
        theirs.update(k_diffusion_runs(process))
    table: dict[str, dict[int, list]] = {name: {} for name in [*ours, *theirs]}
    for seed in seeds:
        x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(100 + seed))
        reference = ODEReference(model, x_T)
        for name, make in ours.items():
            for k in budgets:
                table[name].setdefault(k, []).append(reference.run(make(k)))
        for name, run in theirs.items():
            for k in budgets:
                samples, nfe = run(x_T, k)
                table[name].setdefault(k, []).append((nfe, reference.distance(samples)))
        print("seed", seed, flush=True)
    return {name: {k: (v[0][0], sum(e for _, e in v) / len(v)) for k, v in row.items()}
            for name, row in table.items()}


def library(name: str) -> str:
    """Whose row: diffusers' are capitalised, k-diffusion's prefixed, the rest dkit's."""
    if name.startswith("k-diffusion"):
        return "k-diffusion"
    return "diffusers" if name[0].isupper() else "dkit"


def best_of(errors: dict, lib: str, k: int) -> tuple[float, str] | None:
    """The lowest error of ``lib``'s rows at budget ``k`` (true NFE at most ``k``)."""
    cells = [(row[k][1], name) for name, row in errors.items()
             if library(name) == lib and k in row and row[k][0] <= k]
    return min(cells) if cells else None


def nfe_to_reach(errors: dict, lib: str, target: float = TARGET_ERROR
                 ) -> tuple[int, str] | None:
    """The fewest true NFE (budgets of :data:`SWEEP`) at which one of ``lib``'s rows has error
    at most ``target``; None when none within the sweep."""
    cells = [(nfe, name) for name, row in errors.items() if library(name) == lib
             for k, (nfe, error) in row.items() if k in SWEEP and error <= target]
    return min(cells) if cells else None


# one colour per curve (the sweep has 11): matplotlib's tab10 and a dark navy
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
           (0, 0, 110)]


def plot(curves: dict[str, list[tuple[int, float]]], target: float, path: Path) -> None:
    """SWD / floor against NFE (log-log), drawn with Pillow."""
    width, height, left, right, top, bottom = 900, 560, 70, 300, 30, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [n for c in curves.values() for n, _ in c]
    ys = [max(q, 0.5) for c in curves.values() for _, q in c]
    x_lo, x_hi = math.log10(min(xs)) - 0.05, math.log10(max(xs)) + 0.05
    y_lo, y_hi = math.log10(0.5), math.log10(max(ys)) + 0.05

    def to_pixel(n: float, q: float) -> tuple[float, float]:
        px = left + (math.log10(n) - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (math.log10(max(q, 0.5)) - y_lo) / (y_hi - y_lo) * (
            height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for decade in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000):
        if x_lo <= math.log10(decade) <= x_hi:
            px, _ = to_pixel(decade, 1)
            draw.line([px, top, px, height - bottom], fill=(230, 230, 230))
            draw.text((px - 8, height - bottom + 6), str(decade), fill=(0, 0, 0))
    for level in (0.5, 1, 2, 5, 10, 20, 50):
        if y_lo <= math.log10(level) <= y_hi:
            _, py = to_pixel(1, level)
            draw.line([left, py, width - right, py], fill=(230, 230, 230))
            draw.text((left - 30, py - 6), f"{level:g}", fill=(0, 0, 0))
    _, ty = to_pixel(1, target)
    draw.line([left, ty, width - right, ty], fill=(0, 0, 0), width=1)
    draw.text((left + 4, ty - 14), "1000-step ancestral", fill=(0, 0, 0))
    for k, (name, points) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        pixels = [to_pixel(n, q) for n, q in sorted(points)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.line([width - right + 15, top + 12 + 22 * k, width - right + 35, top + 12 + 22 * k],
                  fill=colour, width=3)
        draw.text((width - right + 40, top + 6 + 22 * k), name, fill=(0, 0, 0))
    draw.text((left + (width - left - right) // 2 - 80, height - 22),
              "network evaluations (NFE)", fill=(0, 0, 0))
    draw.text((6, top - 22), "SWD / noise floor", fill=(0, 0, 0))
    image.save(path)


COMMAND = "OMP_NUM_THREADS=1 python benchmarks/solvers.py"


OVERHEAD_HEADING = "Overhead outside the network per `sample()` call"


def kept_overhead(page: Path) -> list[str]:
    """The overhead section of the page as it stands (from its heading to the end), for
    ``--keep-overhead``: timings are worth recording only from a quiet machine."""
    lines = page.read_text().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith(OVERHEAD_HEADING)), None)
    if first is None:
        raise SystemExit(f"--keep-overhead: {page} has no overhead section to keep")
    return lines[first:]


def error_lines(errors: dict) -> list[str]:
    """The page's section on the error against the probability-flow ODE."""
    libraries = [lib for lib in ("dkit", "diffusers", "k-diffusion")
                 if any(library(name) == lib for name in errors)]
    lines = [
        "Error against the probability-flow ODE (DDPM linear schedule, T = 1000, exact score of "
        "the three-mode mixture): RMS per coordinate to a tight solve (`ODEReference`: "
        "DPM-Solver++(3M), 1000 log-SNR steps) from the same start noise, N = 20,000, mean of "
        "3 seeds; cells are `error (true NFE)`. A row without a grid in brackets is the "
        "solver with its defaults (`spacing: auto`, DDPM's quadratic grid); diffusers rows "
        "(capitalised) use its schedulers' defaults on the same exact network; k-diffusion "
        "rows run its samplers on its karras (rho = 7) and exponential grids between DDPM's "
        "smallest and largest noise levels with the same exact score as a denoiser (the SDE "
        "samplers with eta = 0: their ODE limits); `tuned times` rows are the solver on "
        "times `tune_times` chose for each budget from "
        f"{CALIBRATION} other start draws (seed {CALIBRATION_SEED}, none of the seeds "
        "measured; docs/solvers.md); all in the same process "
        f"(diffusers {diffusers_version()}, k-diffusion {k_diffusion_version()}).",
        "",
        "| solver | " + " | ".join(f"{k} NFE" for k in BUDGETS) + " |",
        "|---|" + "---|" * len(BUDGETS),
    ]
    for name, row in errors.items():
        cells = " | ".join(f"{row[k][1]:.4f} ({row[k][0]})" for k in BUDGETS)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "Best of each library (true NFE at most the budget):", "",
              "| NFE | " + " | ".join(libraries) + " | dkit / best peer |",
              "|---|" + "---|" * (len(libraries) + 1)]
    for k in BUDGETS:
        bests = {lib: best_of(errors, lib, k) for lib in libraries}
        cells = [f"{b[0]:.4f} ({b[1]})" if b else "-" for b in bests.values()]
        peers = [b[0] for lib, b in bests.items() if lib != "dkit" and b]
        ratio = f"{bests['dkit'][0] / min(peers):.2f}" if peers and bests.get("dkit") else "-"
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {ratio} |")
    reach = []
    for lib in libraries:
        found = nfe_to_reach(errors, lib)
        reach.append(f"{lib} **{found[0]}** ({found[1]})" if found else
                     f"{lib} more than {SWEEP[-1]}")
    lines += ["", f"Fewest NFE to reach error <= {TARGET_ERROR} (every budget from "
              f"{SWEEP[0]} to {SWEEP[-1]} swept): " + "; ".join(reach) + "."]
    defaults = ("euler", "heun", "dpm_solver_2m", "dpm_solver_3m", "unipc")
    worst = max((errors[name][5][1], name) for name in defaults)
    lines += ["", f"5 NFE: 5-step DDIM {errors['ddim (uniform)'][5][1]:.4f}; the worst of the "
              f"other solvers with their defaults: {worst[0]:.4f} ({worst[1]})."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["overhead", "public", "errors"], default=None,
                        help="run one part and print it (docs/ are written by a full run only)")
    parser.add_argument("--compile-noise", action="store_true",
                        help="--only public: also time DKIT_COMPILE_NOISE=1 (compiles first)")
    parser.add_argument("--keep-overhead", action="store_true",
                        help="full run without timing: carry the page's overhead table over "
                             "(timings taken on a loaded machine mean nothing)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and timings are stable
    if args.only == "overhead":
        for name, seconds, ratio in overhead():
            print(f"{name:45s} {seconds * 1e6:7.0f} us  {ratio:.2f}")
        return
    if args.only == "public":
        for n, rounds in ((64, ROUNDS), (20000, 20)):
            for name, seconds, ratio in public_overhead(n, rounds=rounds,
                                                        fused=args.compile_noise):
                print(f"N = {n:5d} {name:55s} {seconds * 1e6:9.0f} us  {ratio:.2f}", flush=True)
        return
    if args.only == "errors":
        errors = ode_errors()
        for name, row in errors.items():
            print(name, {k: f"{row[k][1]:.4f} ({row[k][0]})" for k in BUDGETS}, flush=True)
        print("\n".join(error_lines(errors)))
        return
    docs = ROOT / "docs"
    page = docs / "solvers_benchmark.md"
    kept = kept_overhead(page) if args.keep_overhead else None
    curves: dict[str, list[tuple[int, float]]] = {}
    for name, (make, process, settings) in SWEEPS.items():
        curves[name] = [quality(make(k), process()) for k in settings]
        print(name, [(n, round(q, 2)) for n, q in curves[name]], flush=True)
    target = dict(curves["ancestral (DDPM, beta~)"])[1000]
    best = min(((n, name) for name, c in curves.items() for n, q in c if q <= target),
               default=None)
    scipy_nfe = dict(zip([2, 3, 4, 5], [n for n, _ in curves["scipy RK45, rtol=atol (VP)"]],
                         strict=True))[5]
    errors = ode_errors()
    for name, row in errors.items():
        print(name, row, flush=True)
    rows = [] if kept is not None else overhead()
    for row in rows:
        print(row, flush=True)
    plot(curves, target, docs / "solvers_swd_vs_nfe.png")
    command = COMMAND + (" --keep-overhead" if kept is not None else "")
    lines = [
        "<!-- written by benchmarks/solvers.py; do not edit by hand -->",
        f"Command: `{command}` (torch {torch.__version__}, one thread).",
        "",
        f"Target: three-mode 2-D Gaussian mixture, exact score; {N} samples, SWD over 256 "
        f"directions; noise floor (exact vs exact) = {FLOOR:.4f}.",
        "",
        "| solver | NFE -> SWD / noise floor |",
        "|---|---|",
    ]
    for name, points in curves.items():
        cells = ", ".join(f"{n}: {q:.2f}" for n, q in points)
        lines.append(f"| {name} | {cells} |")
    lines += [
        "",
        f"1000-step ancestral sampling reaches {target:.2f} x the floor. "
        + (f"Fewest NFE at or below it: **{best[0]}** ({best[1]})." if best else
           "No solver in the sweep reached it with fewer NFE."),
        f"scipy RK45 probability-flow ODE at rtol = atol = 1e-5: **{scipy_nfe} NFE** "
        "(plus one for the final denoising step).",
        "",
        *error_lines(errors),
        "",
    ]
    if kept is not None:
        lines += kept
    else:
        lines += [
            f"{OVERHEAD_HEADING} (N = 64, 20 evaluations, a free network whose own time is "
            f"subtracted, best of {ROUNDS} rounds in which every loop runs once in turn; "
            "set-up included, tables cached):",
            "",
            "| loop | time outside the network | / hand-written |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {sec * 1e6:.0f} us | {ratio:.2f} |" for name, sec, ratio in rows]
    page.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
