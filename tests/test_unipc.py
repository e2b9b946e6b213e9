"""UniPC (Zhao et al. 2023) on the exact-score mixture: it samples the mixture, it is a
high-order solver of the probability-flow ODE, and its predictor reduces to known methods."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.processes import DDPM, VE, VP
from diffusers_kit.solvers import DDIM, DPMSolver2M, DPMSolver3M, EulerODE, UniPC
from diffusers_kit.solvers.ode import usable_orders
from diffusers_kit.solvers.unipc import unipc_weights
from diffusers_kit.testing import ODEReference
from tests.gaussian_mixture import exact_model, three_modes
from tests.test_solvers_analytic import FACTOR, N, swd_ratio

MIXTURE = three_modes()


@pytest.mark.parametrize("process", [DDPM, VP, VE])
def test_unipc_reproduces_the_mixture(process):
    process = VE(sigma_min=0.01, sigma_max=20.0) if process is VE else process()
    model = exact_model(MIXTURE, process)
    result = UniPC().sample(model, (N, 2), generator=torch.Generator().manual_seed(3))
    assert result.nfe == 20
    ratio = swd_ratio(result.samples)
    assert ratio < FACTOR, f"SWD is {ratio:.2f} x the noise floor"


@pytest.fixture(scope="module")
def ode():  # type: ignore[no-untyped-def]
    """The exact model on DDPM, a start noise and the error to the tight ODE solution from it."""
    model = exact_model(MIXTURE, DDPM())
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(8))
    reference = ODEReference(model, x_T)

    def error(solver) -> float:  # type: ignore[no-untyped-def]
        # a discrete process snaps the grid to its steps (two of 40 log-SNR steps on DDPM meet,
        # for every grid solver); nfe is the grid's true count
        assert solver.total_steps(model.process) >= solver.steps - 1
        return reference.error(solver)

    return model, x_T, error


def test_unipc_is_a_high_order_ode_solver(ode):
    """Closer to the exact probability-flow solution than DPM-Solver++(2M) at 10 and 20 NFE
    (measured: 0.065 / 0.018 against 0.076 / 0.026), and its error falls faster than a
    second-order method's from 20 to 40 NFE (measured ratio 5.5; second order: 4). On equal
    log-SNR steps, where the steps are equal in the variable the orders are stated in (on
    DDPM's default quadratic grid order 3 at 20 NFE is no better than order 2: 0.011 / 0.008)."""
    grid = {"spacing": "log_snr"}
    _, _, error = ode
    ours = {k: error(UniPC(steps=k, **grid)) for k in (5, 10, 20, 40)}
    for k in (10, 20):
        assert ours[k] < 0.95 * error(DPMSolver2M(steps=k, **grid)), k
    assert ours[5] < error(DDIM(steps=5))
    assert ours[20] / ours[40] > 4.5, ours
    third = {k: error(UniPC(steps=k, order=3, **grid)) for k in (20, 40)}
    assert third[20] / third[40] > 5.5, third
    assert third[20] < ours[20]


def test_the_quadratic_grid_is_better_on_ddpm_and_worse_on_ve(ode):
    """The trade-off behind ``spacing: auto`` (DDPM's ``default_spacing`` is ``quadratic``,
    VE's ``log_snr``): on DDPM the quadratic grid is the more accurate at 5, 10 and 20 NFE
    (measured error ratios to the log-SNR grid 0.52 / 0.66 / 0.45), on VE the less accurate
    (1.45 / 1.77 / 2.22); and the default takes the better one on each."""
    _, _, error = ode
    for k in (5, 10, 20):
        log_snr = error(UniPC(steps=k, spacing="log_snr"))
        assert error(UniPC(steps=k, spacing="quadratic")) < 0.8 * log_snr, k
        assert error(UniPC(steps=k)) == error(UniPC(steps=k, spacing="quadratic")), k
        assert error(DPMSolver2M(steps=k, spacing="quadratic")) < 0.8 * error(
            DPMSolver2M(steps=k, spacing="log_snr")), k
    process = VE(sigma_min=0.01, sigma_max=20.0)
    model = exact_model(MIXTURE, process)
    x_T = process.prior_std() * torch.randn(N, 2, generator=torch.Generator().manual_seed(8))
    ve_error = ODEReference(model, x_T).error
    for k in (5, 10, 20):
        log_snr = ve_error(UniPC(steps=k, spacing="log_snr"))
        assert ve_error(UniPC(steps=k, spacing="quadratic")) > 1.2 * log_snr, k
        assert ve_error(UniPC(steps=k)) == log_snr, k


def test_the_predictor_alone_is_ddim_and_dpm_solver_2m(ode):
    """Without the corrector UniP-1 is DDIM (Euler in log-SNR) and UniP-2 with a_1 = 1/2 and
    B(h) = e^h - 1 is DPM-Solver++(2M): the same samples, to rounding."""
    model, x_T, _ = ode

    def samples(solver):  # type: ignore[no-untyped-def]
        return solver.sample(model, (N, 2), x_T=x_T).samples

    for steps in (5, 20):
        assert torch.allclose(samples(UniPC(steps=steps, order=1, corrector=False)),
                              samples(EulerODE(steps=steps)), atol=1e-4)
        assert torch.allclose(samples(UniPC(steps=steps, order=2, corrector=False)),
                              samples(DPMSolver2M(steps=steps)), atol=1e-4)


def test_weights_are_consistent():
    """Each step's weights on the data predictions sum to 1 - r (an exact x0 prediction that is
    the same at every step is a fixed point), the last step is y = m_0, no corrector is taken
    at the last evaluation, and UniC-1's weight on the new prediction is the exponential
    trapezoid's 1 - (1 - r) / h."""
    lam = [-4.0, -2.5, -1.2, 0.3, 1.5, 3.0, float("inf")]
    for order in (1, 2, 3):
        for variant in ("bh1", "bh2"):
            plan = unipc_weights(lam, order, True, variant)
            for step in plan:
                assert sum(step.predictor) == pytest.approx(1 - step.r)
                if step.corrector is not None:
                    assert sum(step.corrector) == pytest.approx(1 - step.r)
            assert plan[-1].r == 0 and plan[-1].predictor == [1.0]
            assert plan[-2].corrector is None and plan[-3].corrector is not None
    first = unipc_weights(lam, 2, True, "bh2")[0]
    h = lam[1] - lam[0]
    assert first.corrector[0] == pytest.approx(0.5 * (1 - first.r))  # a_1 = 1/2 (UniC-1)
    exact = unipc_weights(lam, 1, True, "bh2")[0]
    assert exact.corrector is not None and len(exact.corrector) == 2
    assert first.r == pytest.approx(torch.exp(torch.tensor(-h)).item())


def test_tables_are_cached_and_results_repeat():
    model = exact_model(MIXTURE, VP())
    solver = UniPC(steps=8)
    assert solver.cached_grid(model.process) is solver.cached_grid(model.process)
    one = solver.sample(model, (64, 2), generator=torch.Generator().manual_seed(1)).samples
    two = solver.sample(model, (64, 2), generator=torch.Generator().manual_seed(1)).samples
    assert torch.equal(one, two)
    recorded = UniPC(steps=8, record={"what": ["x", "x0"], "snapshots": 3}).sample(
        model, (64, 2), generator=torch.Generator().manual_seed(1))
    assert len(recorded.trajectory) == len(recorded.x0_predictions) == 3
    assert torch.equal(recorded.samples, one)


def test_lower_order_final_is_the_steps_left_to_sigma_min():
    """Below 15 steps no step is of a higher order than the steps left to varsigma_min allow
    (the step onto varsigma = 0 is always first order); from 15 steps, or with the option off,
    only the history limits the order. Order 2 keeps its schedule (first order into
    varsigma_min); order 3 at 5 steps is order 2's (it was [1, 2, 3, 2, 1]: the staircase ended
    on the step onto 0)."""
    assert usable_orders(5, 3, True) == [1, 2, 2, 1, 1]
    assert usable_orders(6, 3, True) == [1, 2, 3, 2, 1, 1]
    assert usable_orders(7, 4, True) == [1, 2, 3, 3, 2, 1, 1]
    assert usable_orders(5, 2, True) == usable_orders(5, 3, True)
    assert usable_orders(10, 2, True) == [1, *[2] * 7, 1, 1]
    assert usable_orders(5, 3, False) == [1, 2, 3, 3, 1]
    assert usable_orders(15, 3, True) == usable_orders(15, 3, False) == [1, 2, *[3] * 12, 1]
    assert usable_orders(1, 3, True) == [1] and usable_orders(2, 3, True) == [1, 1]


def test_third_order_at_five_steps_is_no_worse_than_second_order_or_ddim(ode):
    """At 5 NFE the third-order solvers with their default lower-order final steps are as
    good as their second-order versions and better than 5-step DDIM (measured on the mixture,
    N = 20,000, 3 seeds: DPM-Solver++(3M) 0.236, UniPC order 3 0.227, DDIM 0.345; the schedule
    that ended on the step onto 0 gave 0.356 and 0.414); at 20 steps the option changes
    nothing (bit for bit)."""
    model, x_T, error = ode
    ddim = error(DDIM(steps=5))
    third, second = error(DPMSolver3M(steps=5)), error(DPMSolver2M(steps=5))
    assert third <= second * (1 + 1e-4) and third < 0.8 * ddim, (third, second, ddim)
    third, second = error(UniPC(steps=5, order=3)), error(UniPC(steps=5))
    assert third <= second * (1 + 1e-4) and third < 0.8 * ddim, (third, second, ddim)
    assert error(DPMSolver3M(steps=5, lower_order_final=False)) > 1.2 * error(
        DPMSolver3M(steps=5))
    for make in (lambda **k: DPMSolver3M(steps=20, **k),
                 lambda **k: UniPC(steps=20, order=3, **k)):
        on = make().sample(model, (N, 2), x_T=x_T).samples
        off = make(lower_order_final=False).sample(model, (N, 2), x_T=x_T).samples
        assert torch.equal(on, off)
