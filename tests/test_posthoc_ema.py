"""Post-hoc EMA (Karras et al. 2024): the power-function EMA's weights and width against their
closed forms, the least-squares reconstruction of a stored profile, and a reconstruction on a
small trained model against the average trained directly, within the bound its profile error
sets (Cauchy-Schwarz over the steps' weights)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_kit.ema import (
    PowerEMA,
    gamma_of_sigma_rel,
    power_weights,
    profile_inner,
    sigma_rel_of_gamma,
    solve_coefficients,
)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_and_gamma_invert_each_other(sigma_rel):
    gamma = gamma_of_sigma_rel(sigma_rel)
    assert gamma > -1
    assert math.isclose(sigma_rel_of_gamma(gamma), sigma_rel, rel_tol=1e-10)


@pytest.mark.parametrize("gamma", [0.5, 6.94, 16.97])
def test_the_width_is_the_profiles_relative_std(gamma):
    """The closed form against the profile itself: the standard deviation over ``t`` of the EMA's
    weights after ``t`` steps (cell midpoints, ``t = 20,000``: error ``O(1 / t)``)."""
    t = 20_000
    w = power_weights(t, gamma)
    position = (torch.arange(1, t + 1, dtype=torch.float64) - 0.5) / t
    mean = (w * position).sum()
    std = ((w * (position - mean) ** 2).sum()).sqrt().item()
    assert math.isclose(std, sigma_rel_of_gamma(gamma), rel_tol=1e-3)


@pytest.mark.parametrize("gamma", [0.5, 6.94])
def test_the_running_update_has_the_power_weights(gamma):
    """Feed one-hot 'parameters' (step ``tau`` is the unit vector ``e_tau``): the running EMA is
    its weight vector, which must be ``(tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)``."""
    t = 50
    module = torch.nn.Linear(t, 1, bias=False)
    ema = PowerEMA(module, sigma_rels=[sigma_rel_of_gamma(gamma)], every=10_000)
    for step in range(1, t + 1):
        with torch.no_grad():
            module.weight.zero_()
            module.weight[0, step - 1] = 1.0
        ema.update(module, step)
    torch.testing.assert_close(ema.averages[0][0][0].double(), power_weights(t, gamma),
                               rtol=1e-5, atol=1e-7)
    assert math.isclose(power_weights(t, gamma).sum().item(), 1.0, rel_tol=1e-12)


def test_the_inner_product_is_the_integral():
    """``<p_a, p_b>`` against numerical quadrature of the two profiles."""
    from scipy import integrate

    ta, ga, tb, gb = 300.0, 2.0, 500.0, 9.0

    def p(u, t, g):
        return (g + 1) * u**g / t ** (g + 1) if u <= t else 0.0

    value, _ = integrate.quad(lambda u: p(u, ta, ga) * p(u, tb, gb), 0, ta, limit=200)
    assert math.isclose(profile_inner(ta, ga, tb, gb), value, rel_tol=1e-8)


def test_a_stored_profile_is_reconstructed_exactly():
    snapshots = [(s, g) for s in (100, 200, 300, 400) for g in (gamma_of_sigma_rel(0.05),
                                                               gamma_of_sigma_rel(0.1))]
    x = solve_coefficients(snapshots, 300, gamma_of_sigma_rel(0.1))
    expected = [1.0 if (s, g) == (300, gamma_of_sigma_rel(0.1)) else 0.0 for s, g in snapshots]
    assert max(abs(a - b) for a, b in zip(x, expected, strict=True)) < 1e-6


def test_a_reconstruction_on_a_trained_model_is_within_its_profile_error():
    """A small regression trained 400 steps with snapshots at sigma_rel 0.05 and 0.10 every 40
    steps; the EMA at sigma_rel 0.07 reconstructed from them against the one kept directly.
    The difference is ``sum_tau (w_rec - w_direct)(tau) theta_tau``, at most ``||w_rec -
    w_direct||_2 ||theta||_2`` over the steps: both sides are computed from the run."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    stored = PowerEMA(module, sigma_rels=[0.05, 0.10], every=40)
    direct = PowerEMA(module, sigma_rels=[0.07], every=10_000)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    history = []
    x = torch.randn(256, 3)
    y = torch.sin(x.sum(1, keepdim=True))
    steps = 400
    for step in range(1, steps + 1):
        batch = torch.randint(0, 256, (32,))
        loss = (module(x[batch]) - y[batch]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(torch.cat([p.detach().flatten() for p in module.parameters()]).double())
        stored.update(module, step)
        direct.update(module, step)
    rebuilt = torch.cat([p.flatten() for p in stored.reconstruct(0.07).values()]).double()
    kept = torch.cat([p.flatten() for p in direct.averages[0]]).double()
    # the reconstruction's weights on the steps, and the bound they set
    used = [(s, g) for s, g, _ in stored.snapshots]
    coefficients = solve_coefficients(used, steps, gamma_of_sigma_rel(0.07))
    w_rec = torch.zeros(steps, dtype=torch.float64)
    for c, (s, g) in zip(coefficients, used, strict=True):
        w_rec[:s] += float(c) * power_weights(s, g)
    w_direct = power_weights(steps, gamma_of_sigma_rel(0.07))
    theta = torch.stack(history)  # (steps, parameters)
    predicted = ((w_rec - w_direct)[:, None] * theta).sum(0)
    torch.testing.assert_close(rebuilt - kept, predicted, rtol=1e-4, atol=1e-5)
    bound = (w_rec - w_direct).norm() * theta.norm(dim=0)
    assert ((rebuilt - kept).abs() <= bound + 1e-5).all()
    # and the profiles are close: far closer than the two stored widths are to each other
    assert (w_rec - w_direct).norm() < 0.1 * (power_weights(steps, gamma_of_sigma_rel(0.05))
                                              - w_direct).norm()


def test_the_trainer_updates_the_power_emas():
    """``train.fit(..., post_hoc=PowerEMA(...))``: snapshots of each width every ``every``
    steps, and the last one, asked for by its own width and step, comes back."""
    from diffusers_kit.model import ScoreModel
    from diffusers_kit.networks import MLP
    from diffusers_kit.objectives import FlowMatching
    from diffusers_kit.optim import Adam
    from diffusers_kit.processes import Flow
    from diffusers_kit.train import TrainSettings, fit

    torch.manual_seed(0)
    network = MLP(data_shape=(2,), prediction="velocity")
    model = ScoreModel(Flow(), network)
    post_hoc = PowerEMA(network, sigma_rels=[0.05, 0.1], every=5)
    fit(model, FlowMatching(), torch.randn(64, 2), Adam(lr=0.01),
        TrainSettings(steps=10, batch_size=16, log_every=10), post_hoc=post_hoc)
    assert [(s, round(g, 6)) for s, g, _ in post_hoc.snapshots] == [
        (s, round(g, 6)) for s in (5, 10) for g in post_hoc.gammas]
    stored = post_hoc.reconstruct(0.1)
    for name, value in stored.items():  # the stored profile reconstructs to itself
        index = post_hoc.names.index(name)
        torch.testing.assert_close(value, post_hoc.snapshots[-1][2][index], rtol=1e-5,
                                   atol=1e-6)
