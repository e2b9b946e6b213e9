"""Progressive distillation (Salimans & Ho 2022): the two-step target against its closed form on
Gaussian data, against two probability-flow Euler steps of another code path, the student's grid
against the DDIM sampler's, the weighting, and a short distillation of an exact teacher into a
student sampled with half its steps."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.diffusion import Diffusion
from diffusers_kit.metrics.swd import random_directions, sliced_wasserstein
from diffusers_kit.networks import MLP
from diffusers_kit.objectives.progressive import (
    ProgressiveDistillation,
    ddim_move,
    student_grid,
    two_step_target,
)
from diffusers_kit.optim import Adam
from diffusers_kit.processes import DDPM, VE, VP, Flow
from diffusers_kit.references import TrainedModel
from diffusers_kit.registry import get_registry
from diffusers_kit.solvers import DDIM
from diffusers_kit.solvers.ode import probability_flow_step
from diffusers_kit.testing import ExactMixture, ExactScoreNetwork, three_modes

M, C = 0.3, 0.6  # Gaussian data N(M, C^2) in every dimension
PROCESSES = {"vp": VP(), "ddpm": DDPM(), "ve": VE(sigma_min=0.002, sigma_max=80.0),
             "flow": Flow()}


def exact_teacher(process, mixture: ExactMixture | None = None):  # type: ignore[no-untyped-def]
    mixture = mixture or ExactMixture(weights=[1.0], means=[[M, M]], stds=[[C, C]])
    return Diffusion(process, ExactScoreNetwork(mixture, process, "x0"), device="cpu").model


@pytest.mark.parametrize("name", PROCESSES)
def test_the_target_is_two_ddim_steps_in_closed_form(name):
    """On Gaussian data ``N(M, C^2)`` the ideal denoiser is ``D(y) = M + C^2 / (C^2 + s^2)
    (y - M)`` in ``y = x / alpha``, ``s = sigma / alpha``, and a DDIM step is the Euler step of
    ``dy / ds = (y - D) / s``, so two of them scale ``y - M`` by ``r_1 r_2``, ``r = 1 + (s_next -
    s) s / (C^2 + s^2)``; the one-step target solves ``y'' = y + (s'' - s)(y - x_tilde) / s``.
    Checked on intervals inside the path and on the last one (to ``t = 0``)."""
    process = PROCESSES[name]
    teacher = exact_teacher(process)
    t = torch.tensor([0.9, 0.6, 0.31, 0.05, 0.004], dtype=torch.float64)
    t_next = torch.tensor([0.7, 0.42, 0.2, 0.0, 0.0], dtype=torch.float64)
    t_mid = (t + t_next) / 2
    z = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = z * 0.8 + 0.2
    target = two_step_target(teacher, z, t, t_mid, t_next)

    def level(times: torch.Tensor) -> torch.Tensor:
        alpha, sigma = process.marginal(times)
        return (sigma / alpha)[:, None]

    alpha = process.marginal(t)[0][:, None]
    s, s_mid = level(t), level(t_mid)
    s_next = torch.where(t_next[:, None] == 0, 0.0, level(t_next))  # t = 0: the clean end
    y = z / alpha
    r1 = 1 + (s_mid - s) * s / (C**2 + s**2)
    r2 = 1 + (s_next - s_mid) * s_mid / (C**2 + s_mid**2)
    y_next = M + (y - M) * r1 * r2
    expected = y - s * (y_next - y) / (s_next - s)
    torch.testing.assert_close(target, expected, rtol=1e-10, atol=1e-12)
    # on the last interval the target is where the teacher lands: its prediction at the middle
    last = process.marginal(t_mid[3:4])
    d_mid = M + C**2 / (C**2 + level(t_mid[3:4])**2) * (
        ddim_move(z[3:4], M + C**2 / (C**2 + s[3:4]**2) * (y[3:4] - M),
                  tuple(v[3:4] for v in process.marginal(t)), last) / last[0] - M)
    torch.testing.assert_close(target[3:4], d_mid, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "ve", "flow"])
def test_one_step_of_the_target_lands_where_two_teacher_steps_do(name):
    """The defining property on the three-mode mixture (a non-linear denoiser): a DDIM step of
    ``x_tilde`` from ``t`` to ``t''`` lands on the point that two probability-flow Euler steps
    of the teacher reach (``solvers.ode.probability_flow_step``, another code path)."""
    process = PROCESSES[name]
    teacher = exact_teacher(process, three_modes())
    n = 64
    generator = torch.Generator().manual_seed(1)
    t = torch.rand(n, dtype=torch.float64, generator=generator) * 0.8 + 0.15
    t_next = t * torch.rand(n, dtype=torch.float64, generator=generator).clamp(0.2, 0.9)
    t_mid = (t + t_next) / 2
    x0 = three_modes().sample(n, generator)
    z, _ = process.marginal_sample(x0, t, torch.randn(n, 2, dtype=torch.float64,
                                                      generator=generator))
    target = two_step_target(teacher, z, t, t_mid, t_next)
    reached = probability_flow_step(
        teacher, probability_flow_step(teacher, z, t, t_mid, "euler"), t_mid, t_next, "euler")
    one_step = ddim_move(z, target, process.marginal(t), process.marginal(t_next))
    torch.testing.assert_close(one_step, reached, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["vp", "ddpm", "flow"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_the_students_grid_is_the_ddim_samplers(name, steps):
    """``{kind: ddim, steps: K}`` evaluates the student at the times it was trained on."""
    process = PROCESSES[name]
    grid = student_grid(process, steps, "uniform")
    assert len(grid) == steps + 1 and grid[0] == 1.0 and grid[-1] == 0.0
    sampler = DDIM(steps=steps).grid(process)
    assert sampler.t == pytest.approx(grid.tolist(), abs=1e-12)  # its N + 1 times, 0 last


def test_the_weightings():
    objective = ProgressiveDistillation(TrainedModel.from_diffusion(
        Diffusion(VP(), ExactScoreNetwork(three_modes(), VP(), "x0"), device="cpu")))
    alpha = torch.tensor([0.1, 0.7, 0.99], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    snr = alpha**2 / sigma**2
    torch.testing.assert_close(objective.weight(alpha, sigma), torch.maximum(snr, torch.ones(3)))
    objective.weighting = "snr_plus_one"
    # on VP, SNR + 1 = 1 / sigma^2: the x0 error weighted so is the v error
    torch.testing.assert_close(objective.weight(alpha, sigma), 1 / sigma**2)


def test_the_component_is_registered():
    assert get_registry().get("objective", "progressive_distillation").factory \
        is ProgressiveDistillation


def test_a_teacher_under_another_process_is_refused():
    teacher = TrainedModel.from_diffusion(
        Diffusion(VP(), ExactScoreNetwork(three_modes(), VP(), "x0"), device="cpu"))
    objective = ProgressiveDistillation(teacher, steps=2, init="none")
    network = MLP(width=8, blocks=1, prediction="x0", data_shape=(2,))
    reason = objective.check(Flow(), network)
    assert reason is not None and "same process" in reason


def test_a_short_distillation_halves_the_steps():
    """An exact three-mode teacher sampled with 4 DDIM steps, distilled (600 steps) into a
    small MLP (an x0 network from scratch, init: none) sampled with 2: the student's 2-step
    samples lie closer to the teacher's 4-step samples from the same start noise (RMS 0.27)
    than the teacher's own 2-step samples do (0.61), and their SWD to the data is lower (0.59
    against 0.87; the teacher's 4 steps 0.46, the data's own floor 0.05)."""
    process = VP()
    mixture = three_modes()
    teacher_model = exact_teacher(process, mixture)
    teacher = TrainedModel.from_diffusion(
        Diffusion(process, ExactScoreNetwork(mixture, process, "x0"), device="cpu"))
    torch.manual_seed(0)
    student = MLP(width=64, blocks=2, prediction="x0", data_shape=(2,))
    objective = ProgressiveDistillation(teacher, steps=2, init="none")
    diffusion = Diffusion(process, student, objective, device="cpu")
    generator = torch.Generator().manual_seed(6)
    data = mixture.sample(4096, generator)
    diffusion.fit(data, steps=600, batch_size=256, optimizer=Adam(lr=2e-3), ema_decay=0.99,
                  log_every=100)
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    teacher_diffusion = Diffusion(process, teacher_model.network, device="cpu")
    four = teacher_diffusion.sample(2000, DDIM(steps=4), seed=1, x_T=x_T).samples
    two = teacher_diffusion.sample(2000, DDIM(steps=2), seed=1, x_T=x_T).samples
    distilled = diffusion.sample(2000, DDIM(steps=2), seed=1, x_T=x_T).samples
    student_gap = (distilled - four).pow(2).sum(1).mean().sqrt().item()
    teacher_gap = (two - four).pow(2).sum(1).mean().sqrt().item()
    assert student_gap < 0.5 * teacher_gap, (student_gap, teacher_gap)
    directions = random_directions(2, 256, torch.Generator().manual_seed(7))
    reference = mixture.sample(2000, generator)
    assert sliced_wasserstein(distilled, reference, directions) < sliced_wasserstein(
        two, reference, directions), "the student's 2 steps beat the teacher's 2 steps"
