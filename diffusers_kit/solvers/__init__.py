"""Samplers and solvers (kind ``solver``), with the predictors and correctors that
predictor-corrector sampling composes (kinds ``predictor`` and ``corrector``)."""

from diffusers_kit.solvers.ancestral import Ancestral
from diffusers_kit.solvers.base import Record, Recorder, SampleResult, Solver
from diffusers_kit.solvers.consistency import ConsistencySampler
from diffusers_kit.solvers.ddim import DDIM
from diffusers_kit.solvers.langevin import AnnealedLangevin, Langevin
from diffusers_kit.solvers.noise import GeneratorNoise, Noise, PerSampleNoise
from diffusers_kit.solvers.ode import (
    DPMSolver2M,
    DPMSolver3M,
    EDMStochastic,
    EulerODE,
    HeunODE,
    ScipyODE,
)
from diffusers_kit.solvers.repaint import RePaint
from diffusers_kit.solvers.sde import (
    AncestralPredictor,
    Corrector,
    EulerMaruyama,
    LangevinCorrector,
    NoCorrector,
    NoPredictor,
    Predictor,
    PredictorCorrector,
    ReverseDiffusion,
)
from diffusers_kit.solvers.unipc import UniPC

REGISTER = [
    ("solver", "annealed_langevin", AnnealedLangevin),
    ("solver", "langevin", Langevin),
    ("solver", "ancestral", Ancestral),
    ("solver", "ddim", DDIM),
    ("solver", "predictor_corrector", PredictorCorrector),
    ("solver", "scipy_ode", ScipyODE),
    ("solver", "euler", EulerODE),
    ("solver", "heun", HeunODE),
    ("solver", "dpm_solver_2m", DPMSolver2M),
    ("solver", "dpm_solver_3m", DPMSolver3M),
    ("solver", "unipc", UniPC),
    ("solver", "edm_stochastic", EDMStochastic),
    ("solver", "repaint", RePaint),
    ("solver", "consistency", ConsistencySampler),
    ("predictor", "euler_maruyama", EulerMaruyama),
    ("predictor", "reverse_diffusion", ReverseDiffusion),
    ("predictor", "ancestral", AncestralPredictor),
    ("predictor", "none", NoPredictor),
    ("corrector", "langevin", LangevinCorrector),
    ("corrector", "none", NoCorrector),
]

__all__ = [
    "DDIM",
    "REGISTER",
    "Ancestral",
    "AncestralPredictor",
    "AnnealedLangevin",
    "ConsistencySampler",
    "Corrector",
    "DPMSolver2M",
    "DPMSolver3M",
    "EDMStochastic",
    "EulerMaruyama",
    "EulerODE",
    "GeneratorNoise",
    "HeunODE",
    "Langevin",
    "LangevinCorrector",
    "NoCorrector",
    "NoPredictor",
    "Noise",
    "PerSampleNoise",
    "Predictor",
    "PredictorCorrector",
    "RePaint",
    "Record",
    "Recorder",
    "ReverseDiffusion",
    "SampleResult",
    "ScipyODE",
    "Solver",
    "UniPC",
]
