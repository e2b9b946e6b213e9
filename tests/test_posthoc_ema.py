"""Post-hoc EMA (Karras et al. 2024): the power-function EMA's weights and width against their
closed forms, the least-squares reconstruction of a stored profile, and a reconstruction on a
small trained model against the average trained directly, within the bound its profile error
sets (Cauchy-Schwarz over the steps' weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffusers_kit.ema import (
    PowerEMA,
    gamma_of_sigma_rel,
    power_weights,
    profile_error,
    profile_inner,
    sigma_rel_of_gamma,
    solve_coefficients,
)
from tests.helpers import run_cli, write_spec


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


@pytest.mark.parametrize(("ta", "ga", "tb", "gb"), [
    (300.0, 2.0, 500.0, 9.0), (500.0, 9.0, 300.0, 2.0),
    # short averages late in a run: low ** (gamma_a + gamma_b + 1) alone overflows a float
    (2600.0, gamma_of_sigma_rel(0.02), 1300.0, gamma_of_sigma_rel(0.015)),
    (1.0e6, gamma_of_sigma_rel(0.01), 9.9e5, gamma_of_sigma_rel(0.01)),
])
def test_the_inner_product_is_the_integral(ta, ga, tb, gb):
    """``<p_a, p_b>`` against numerical quadrature of the two profiles."""
    from scipy import integrate

    def p(u, t, g):
        return (g + 1) / t * (u / t) ** g if u <= t else 0.0

    low = min(ta, tb)
    value, _ = integrate.quad(lambda u: p(u, ta, ga) * p(u, tb, gb), 0, low, limit=200,
                              points=[0.9 * low, 0.99 * low], epsrel=1e-11)
    assert math.isclose(profile_inner(ta, ga, tb, gb), value, rel_tol=1e-8)


def test_a_short_average_late_in_a_run_is_reconstructed():
    """sigma_rel 0.02 after 2,600 steps from the 0.05 / 0.10 snapshots every 100 steps (what
    ``dkit sweep`` asked of the digits run): a finite profile error, and 0 for a stored one."""
    snapshots = [(s, gamma_of_sigma_rel(r)) for s in range(100, 2700, 100) for r in (0.05, 0.1)]
    assert 0 < profile_error(snapshots, 2600, gamma_of_sigma_rel(0.02)) < 1
    assert profile_error(snapshots, 2600, gamma_of_sigma_rel(0.05)) < 1e-6


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


# -- the spec and command-line route: train.post_hoc_ema, sample.ema_sigma_rel, dkit sweep -----
POST_HOC_SPEC = """\
name: posthoc
seed: 0
device: cpu
data: {kind: gaussian_mixture, components: 3, radius: 2.0, std: 0.2, n_train: 256,
       n_heldout: 64}
process: {kind: ddpm, num_steps: 50}
network: {kind: mlp, width: 16, blocks: 1, prediction: eps}
objective: {kind: ddpm_simple}
train:
  steps: 40
  batch_size: 32
  log_every: 20
  optimizer: {kind: adam, lr: 0.01}
  post_hoc_ema: {sigma_rels: SIGMA_RELS, every: 4}
sample:
  n: 32
  solver: {kind: ddim, steps: 4}
evaluate:
  metrics:
    - {kind: swd, projections: 16, resamples: 10}
output: {root: {root}}
"""


def _post_hoc_run(tmp: Path, sigma_rels: str, name: str = "posthoc") -> Path:
    from diffusers_kit.cli.main import main

    text = POST_HOC_SPEC.replace("SIGMA_RELS", sigma_rels).replace("name: posthoc",
                                                                   f"name: {name}")
    spec = write_spec(tmp, text, f"{name}.yaml")
    assert main(["run", str(spec), "--quiet"]) == 0
    return next(p for p in (tmp / "runs" / name).iterdir() if p.name != "latest")


@pytest.fixture(scope="module")
def post_hoc_runs(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The same training twice (same seed, same steps): snapshots at 0.05 and 0.10, and the
    EMA of 0.07 kept directly; and once without snapshots."""
    tmp = tmp_path_factory.mktemp("posthoc")
    stored = _post_hoc_run(tmp, "[0.05, 0.10]")
    direct = _post_hoc_run(tmp, "[0.07]", "direct")
    plain_text = POST_HOC_SPEC.replace("  post_hoc_ema: {sigma_rels: SIGMA_RELS, every: 4}\n",
                                       "").replace("name: posthoc", "name: plain")
    from diffusers_kit.cli.main import main

    assert main(["run", str(write_spec(tmp, plain_text, "plain.yaml")), "--quiet"]) == 0
    plain = next(p for p in (tmp / "runs" / "plain").iterdir() if p.name != "latest")
    return stored, direct, plain


def _flat(weights) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.cat([w.detach().flatten().double() for w in weights])


def test_a_run_stores_the_snapshots_in_its_checkpoint(post_hoc_runs):
    from diffusers_kit.run import open_run

    stored, _, _ = post_hoc_runs
    _, components = open_run(stored)
    post_hoc = components.diffusion.post_hoc
    assert post_hoc is not None and post_hoc.sigma_rels == [0.05, 0.10]
    assert [(s, round(g, 6)) for s, g, _ in post_hoc.snapshots] == [
        (s, round(g, 6)) for s in range(4, 41, 4) for g in post_hoc.gammas]
    # the last snapshots are the running averages at the end
    for (_, _, params), average in zip(post_hoc.snapshots[-2:], post_hoc.averages, strict=True):
        torch.testing.assert_close(_flat(params), _flat(average), rtol=0, atol=0)


def test_sampling_at_a_stored_width_uses_that_snapshot(post_hoc_runs):
    """``sample.ema_sigma_rel`` at a stored width: the sampling weights are its last snapshot
    (the least-squares reconstruction of a stored profile is the profile itself)."""
    from diffusers_kit.run import open_run

    stored, _, _ = post_hoc_runs
    _, components = open_run(stored, ["sample.ema_sigma_rel=0.1"])
    diffusion = components.diffusion
    snapshot = diffusion.post_hoc.snapshots[-1]
    assert snapshot[0] == 40 and math.isclose(snapshot[1], gamma_of_sigma_rel(0.1))
    torch.testing.assert_close(_flat(diffusion.ema.shadow), _flat(snapshot[2]), rtol=1e-5,
                               atol=1e-6)


def test_a_reconstruction_matches_the_ema_trained_directly(post_hoc_runs):
    """The run with snapshots at 0.05 and 0.10 reconstructs sigma_rel 0.07; the run that kept
    0.07 directly trained the same weights (snapshots do not touch training). Stated tolerance:
    the reconstruction lies within a tenth of the distance between the direct EMA and the
    nearest stored width's (the profile-level statement of
    test_a_reconstruction_on_a_trained_model_is_within_its_profile_error, on the weights)."""
    from diffusers_kit.run import open_run

    stored, direct, _ = post_hoc_runs
    _, mine = open_run(stored, ["sample.ema_sigma_rel=0.07"])
    _, theirs = open_run(direct)
    torch.testing.assert_close(_flat(mine.diffusion.network.parameters()),
                               _flat(theirs.diffusion.network.parameters()), rtol=0, atol=0)
    rebuilt = _flat(mine.diffusion.ema.shadow)
    kept = _flat(theirs.diffusion.post_hoc.averages[0])
    nearest = _flat(mine.diffusion.post_hoc.averages[0])  # sigma_rel 0.05 at step 40
    assert (rebuilt - kept).norm() < 0.1 * (nearest - kept).norm()


def test_dkit_sample_and_sweep_take_the_ema_length(post_hoc_runs, capsys):
    stored, _, _ = post_hoc_runs
    code, _, err = run_cli(["sample", str(stored), "--ema-sigma-rel", "0.07", "--n", "8"],
                           capsys)
    assert code == 0, err
    code, out, err = run_cli(["sweep", str(stored), "sample.ema_sigma_rel=0.04,0.07,0.12",
                              "--quiet"], capsys)
    assert code == 0, err
    (folder,) = sorted((stored / "sweeps").glob("sample.ema_sigma_rel-*"))
    record = json.loads((folder / "sweep.json").read_text())
    figures = [p["metrics"]["swd"] for p in record["points"]]
    assert len(set(figures)) == 3  # three different sets of weights
    best = figures.index(min(figures))
    assert record["best"]["metric"] == "swd" and record["best"]["direction"] == "min"
    assert record["best"]["value"] == [0.04, 0.07, 0.12][best]
    assert f"best by swd (lowest): sample.ema_sigma_rel={record['best']['text']}" in out


@pytest.mark.parametrize("args, expected", [
    (["--ema-sigma-rel", "0.3"], "less than 0.2886"),
    (["--ema-sigma-rel", "0"], "greater than 0"),
])
def test_a_bad_width_is_a_spec_error(post_hoc_runs, capsys, args, expected):
    stored, _, _ = post_hoc_runs
    code, _, err = run_cli(["sample", str(stored), *args], capsys)
    assert code == 2
    assert "sample.ema_sigma_rel" in err and expected in err and "Traceback" not in err


def test_a_run_without_snapshots_is_a_spec_error(post_hoc_runs, capsys):
    _, _, plain = post_hoc_runs
    code, _, err = run_cli(["sample", str(plain), "--ema-sigma-rel", "0.05"], capsys)
    assert code == 2
    assert "sample.ema_sigma_rel" in err and "train.post_hoc_ema" in err
    assert "Traceback" not in err


def test_the_spec_options_are_validated_with_their_line(tmp_path, capsys):
    bad = POST_HOC_SPEC.replace("SIGMA_RELS", "[0.05, 0.4]")
    code, _, err = run_cli(["validate", str(write_spec(tmp_path, bad))], capsys)
    assert code == 2
    assert "train.post_hoc_ema.sigma_rels[1]" in err and "spec.yaml:14" in err
    orphan = POST_HOC_SPEC.replace("  post_hoc_ema: {sigma_rels: SIGMA_RELS, every: 4}\n", "")
    orphan = orphan.replace("  n: 32\n", "  n: 32\n  ema_sigma_rel: 0.05\n")
    code, _, err = run_cli(["validate", str(write_spec(tmp_path, orphan, "o.yaml"))], capsys)
    assert code == 2
    assert "sample.ema_sigma_rel" in err and "train.post_hoc_ema" in err


def test_snapshots_change_the_training_hash_only_when_set(tmp_path):
    from diffusers_kit.registry import get_registry
    from diffusers_kit.spec.loader import load_file
    from diffusers_kit.spec.references import spec_hash
    from diffusers_kit.spec.validate import validate

    def digest(text: str) -> str:
        return spec_hash(validate(load_file(write_spec(tmp_path, text)), get_registry()))

    without = POST_HOC_SPEC.replace("  post_hoc_ema: {sigma_rels: SIGMA_RELS, every: 4}\n", "")
    null = POST_HOC_SPEC.replace("{sigma_rels: SIGMA_RELS, every: 4}", "null")
    with_ = POST_HOC_SPEC.replace("SIGMA_RELS", "[0.05]")
    assert digest(without) == digest(null) != digest(with_)


def test_a_resumed_run_continues_the_power_emas_exactly(tmp_path):
    """Stopped at step 6 and resumed to 12: the snapshots and averages of an uninterrupted
    run, bit for bit (they travel in the checkpoint's training state)."""
    from diffusers_kit.diffusion import Diffusion
    from diffusers_kit.networks import MLP
    from diffusers_kit.objectives import FlowMatching
    from diffusers_kit.processes import Flow

    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))

    def fresh() -> Diffusion:
        torch.manual_seed(0)
        return Diffusion(Flow(), MLP(data_shape=(2,), prediction="velocity"), FlowMatching(),
                         device="cpu")

    options = {"batch_size": 16, "log_every": 3, "post_hoc_sigma_rels": [0.05, 0.1],
               "post_hoc_every": 4}
    whole = fresh().fit(data, steps=12, **options)
    path = tmp_path / "checkpoint.safetensors"
    first = fresh()
    first.fit(data, steps=6, checkpoint_every=6, on_checkpoint=lambda s: first.save(path),
              **options)
    resumed = fresh().fit(data, steps=12, resume=path, **options)
    assert [(s, g) for s, g, _ in resumed.post_hoc.snapshots] == [
        (s, g) for s, g, _ in whole.post_hoc.snapshots]
    for (_, _, a), (_, _, b) in zip(resumed.post_hoc.snapshots, whole.post_hoc.snapshots,
                                    strict=True):
        torch.testing.assert_close(_flat(a), _flat(b), rtol=0, atol=0)
    for a, b in zip(resumed.post_hoc.averages, whole.post_hoc.averages, strict=True):
        torch.testing.assert_close(_flat(a), _flat(b), rtol=0, atol=0)
