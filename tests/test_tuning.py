"""A solver's own evaluation times (``times``) and the grid tuned to a model (``tune_times``).

The times option must reproduce any grid it is given (the same samples, bit for bit, as the
spacing that made it) and refuse grids a process cannot take; the tuned grid must beat the
solver's default on start noise it was not tuned on, on the exact-score three-mode mixture."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from diffusers_kit.model import ScoreModel
from diffusers_kit.processes import DDPM, VP, Flow
from diffusers_kit.solvers import DPMSolver3M, EDMStochastic, EulerODE, HeunODE, UniPC
from diffusers_kit.solvers.grids import sampling_times
from diffusers_kit.solvers.tuning import reference_solution, tune_times
from diffusers_kit.testing import ExactScoreNetwork
from tests.gaussian_mixture import exact_model, three_modes
from tests.helpers import MOONS_SPEC, finished_run, run_cli, write_spec

MIXTURE = three_modes()


def model_of(process):  # type: ignore[no-untyped-def]
    """The exact model; on a path from pure noise (``alpha(1) = 0``) one that predicts ``x0``
    (an ``eps`` network says nothing about ``x0`` there)."""
    if process.alpha(torch.ones(1, dtype=torch.float64))[0] == 0:
        return ScoreModel(process, ExactScoreNetwork(MIXTURE, process, prediction="x0"))
    return exact_model(MIXTURE, process)


def noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("process", [DDPM(), VP()], ids=["ddpm", "vp"])
@pytest.mark.parametrize("make", [
    lambda **kw: UniPC(**kw), lambda **kw: EulerODE(**kw), lambda **kw: HeunODE(**kw),
    lambda **kw: DPMSolver3M(**kw), lambda **kw: EDMStochastic(S_churn=0.0, **kw)],
    ids=["unipc", "euler", "heun", "dpm_solver_3m", "edm_stochastic"])
def test_given_times_reproduce_the_grid_they_came_from(process, make):  # type: ignore[no-untyped-def]
    model, x_T = exact_model(MIXTURE, process), noise(200, 0)
    times = sampling_times(process, 7, "power", 2.5)[:-1].tolist()
    spaced = make(steps=7, spacing="power", rho=2.5).sample(model, (200, 2), x_T=x_T).samples
    given = make(steps=7, times=times).sample(model, (200, 2), x_T=x_T).samples
    assert torch.equal(spaced, given)
    other = make(steps=7, times=[1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.01]).sample(
        model, (200, 2), x_T=x_T).samples
    assert not torch.equal(spaced, other)  # the option is not ignored


def test_times_that_do_not_fit_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="one time per step: 3 of them"):
        UniPC(steps=3, times=[1.0, 0.5])
    with pytest.raises(ValueError, match="start at 1 and decrease"):
        UniPC(steps=2, times=[0.9, 0.5])
    with pytest.raises(ValueError, match="start at 1 and decrease"):
        UniPC(steps=3, times=[1.0, 0.5, 0.6])
    assert "smallest time 0.001" in UniPC(steps=2, times=[1.0, 0.0004]).check(DDPM())
    assert "the same step 500" in UniPC(steps=3, times=[1.0, 0.5004, 0.5001]).check(DDPM())
    assert UniPC(steps=3, times=[1.0, 0.5004, 0.5001]).check(VP()) is None


def test_a_spec_with_bad_times_fails_validation_on_the_solver(tmp_path, capsys):  # type: ignore[no-untyped-def]
    text = MOONS_SPEC.replace(
        "process: {kind: ve, sigma_min: 0.01, sigma_max: 2.0, num_levels: 4}",
        "process: {kind: ddpm}").replace(
        "solver: {kind: annealed_langevin, steps_per_level: 2, epsilon: 1.0e-4}",
        "solver: {kind: unipc, steps: 3, times: [1.0, 0.5004, 0.5001]}").replace(
        "objective: {kind: dsm}", "objective: {kind: denoising}")
    code, _out, err = run_cli(["validate", str(write_spec(tmp_path, text))], capsys)
    assert code == 2
    assert "sample.solver.times:" in err and "the same step 500" in err
    assert "Traceback" not in err
    good = text.replace("times: [1.0, 0.5004, 0.5001]", "times: [1.0, 0.3, 0.02]")
    code, _out, err = run_cli(["validate", str(write_spec(tmp_path, good))], capsys)
    assert code == 0, err
    # what the constructor refuses (an OptionError) names the times field and its line too
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "times:" in row)
    for times, why in (("[1.0, 0.3]", "one time per step: 3 of them (steps: 3), or steps "
                                      "changed to match ('unipc'); given [1.0, 0.3]"),
                       ("[1.0, 0.3, 0.4]", "start at 1 and decrease ('unipc'); given [1.0, 0.3, "
                                           "0.4]")):
        bad = text.replace("[1.0, 0.5004, 0.5001]", times)
        code, _out, err = run_cli(["validate", str(write_spec(tmp_path, bad))], capsys)
        flat = " ".join(err.split())
        assert code == 2 and f"spec.yaml:{line} sample.solver.times: expected" in flat, err
        assert why in flat and "Traceback" not in err


@pytest.mark.parametrize(("process", "steps", "most"), [
    (DDPM(), 5, 0.85), (DDPM(), 10, 0.6), (VP(), 6, 0.7), (Flow(), 6, 0.8)],
    ids=["ddpm-5", "ddpm-10", "vp-6", "flow-6"])
def test_tuned_times_beat_the_default_grid_on_noise_they_never_saw(process, steps, most):  # type: ignore[no-untyped-def]
    """Measured ratios (tuned / default error on the held-out draws): 0.71, 0.46, 0.55, 0.65."""
    model = model_of(process)
    tuned = tune_times(model, UniPC(steps=steps), noise(400, 7), max_tries=250)
    times = tuned.times
    assert len(times) == steps and times[0] == 1.0
    assert all(b < a for a, b in itertools.pairwise(times))
    assert tuned.after <= tuned.before and 0 < tuned.tried <= 251
    if process.num_steps is not None:  # on the process's own steps
        assert all(abs(t * 1000 - round(t * 1000)) < 1e-9 for t in times)
    held = noise(4000, 8)
    reference = reference_solution(model, held)

    def error(solver) -> float:  # type: ignore[no-untyped-def]
        samples = solver.sample(model, (4000, 2), x_T=held).samples
        return float((samples - reference).pow(2).mean().sqrt())

    default, better = error(UniPC(steps=steps)), error(tuned.solver)
    assert better <= most * default, (default, better)


def test_only_fixed_step_ode_solvers_are_tuned():
    from diffusers_kit.solvers import Ancestral

    model = exact_model(MIXTURE, DDPM())
    with pytest.raises(TypeError, match="Ancestral is not one"):
        tune_times(model, Ancestral(steps=10), noise(10, 0))
    two = tune_times(model, UniPC(steps=2), noise(50, 0))
    assert two.times == [1.0, 0.001] and two.after == two.before
    # 50 DDPM steps on the quadratic grid snap to 49 distinct ones: the tuned solver says 49
    calls: list[int] = []
    merged = tune_times(model, UniPC(steps=50), noise(50, 0), max_tries=5, reference_steps=100,
                        progress=calls.append)
    assert merged.solver.steps == len(merged.times) == 49
    assert sum(calls) == merged.tried == 6  # the start grid and five candidates


DDPM_MOONS = MOONS_SPEC.replace(
    "process: {kind: ve, sigma_min: 0.01, sigma_max: 2.0, num_levels: 4}",
    "process: {kind: ddpm}").replace(
    "solver: {kind: annealed_langevin, steps_per_level: 2, epsilon: 1.0e-4}",
    "solver: {kind: unipc, steps: 5}").replace(
    "objective: {kind: dsm}", "objective: {kind: denoising}")


def test_the_command_tunes_a_run_and_its_line_samples(tmp_path, capsys):  # type: ignore[no-untyped-def]
    _, run_dir = finished_run(tmp_path, DDPM_MOONS)
    capsys.readouterr()
    before = sorted(p.name for p in run_dir.rglob("*"))
    code, out, err = run_cli(["tune-times", str(run_dir), "--n", "64", "--tries", "30",
                              "--reference-steps", "100"], capsys)
    assert code == 0, err
    assert "tuned" in out and "unipc, 5 steps: grid" in out and "64 calibration draws" in out
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # writes nothing
    line = out.split("--solver '")[1].split("'")[0]
    settings = json.loads(line)
    assert list(settings) == ["kind", "steps", "times"]  # only what differs from defaults
    assert settings["kind"] == "unipc" and settings["steps"] == 5
    assert len(settings["times"]) == 5 and settings["times"][0] == 1.0
    code, out, err = run_cli(["sample", str(run_dir), "--solver", line, "--n", "8"], capsys)
    assert code == 0, err
    assert "5 network evaluations" in out


def test_the_command_refuses_what_it_cannot_tune(tmp_path, capsys):  # type: ignore[no-untyped-def]
    _, run_dir = finished_run(tmp_path, DDPM_MOONS)
    code, _out, err = run_cli(["tune-times", str(run_dir), "--solver", "ancestral"], capsys)
    assert code == 2 and "--solver" in err and "fixed-step ODE solver" in err
    assert "Traceback" not in err
    code, _out, err = run_cli(["tune-times", str(run_dir), "--n", "0"], capsys)
    assert code == 2 and "--n" in err and "positive integer" in err
