"""Guidance against exact answers on a labelled Gaussian mixture (labels = components).

Under any process the mixture's noised class posterior ``p(y | x_t)`` and its class-conditional
score are closed form (:mod:`tests.gaussian_mixture`), so:

- classifier guidance with the exact noisy classifier at ``s = 1`` must sample the exact
  class-conditional distribution (Bayes' rule for scores);
- classifier-free guidance with the exact conditional / unconditional scores at ``w = 1`` must
  too, and at ``w > 1`` it must *not*: the samples sharpen towards the requested class;
- a guidance interval that excludes every step must leave sampling bit-identical.

Quality is the sliced Wasserstein distance to exact labelled draws (the same labels), over the
noise floor of two exact sets; class accuracy is the share of samples whose most probable
component (under the data distribution) is the requested one.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.diffusion import Diffusion
from diffusers_kit.guidance import (
    ClassifierFree,
    ClassifierGuidance,
    GradientGuidance,
    requested_labels,
)
from diffusers_kit.guidance import base as guidance_base
from diffusers_kit.metrics.swd import random_directions, sliced_wasserstein
from diffusers_kit.model import ScoreModel
from diffusers_kit.pipeline import TrainedModel
from diffusers_kit.processes import DDPM, VE, VP
from diffusers_kit.registry import get_registry
from diffusers_kit.solvers import (
    DDIM,
    Ancestral,
    DPMSolver2M,
    HeunODE,
    PredictorCorrector,
)
from tests.gaussian_mixture import (
    ExactClassifierNetwork,
    ExactConditionalNetwork,
    exact_model,
    overlapping_modes,
    separated_modes,
)

N = 1500
FACTOR = 1.6
MIXTURE = separated_modes()
DIRECTIONS = random_directions(2, 128, torch.Generator().manual_seed(7))
LABELS = requested_labels("all", N, 3)


def _reference(mixture, labels: torch.Tensor, seed: int = 11):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    reference = mixture.sample_labelled(labels, generator)
    floors = [sliced_wasserstein(mixture.sample_labelled(labels, generator), reference,
                                 DIRECTIONS) for _ in range(3)]
    return reference, sum(floors) / len(floors)


REFERENCE, FLOOR = _reference(MIXTURE, LABELS)


def swd_ratio(samples: torch.Tensor) -> float:
    assert torch.isfinite(samples).all()
    return sliced_wasserstein(samples, REFERENCE, DIRECTIONS) / FLOOR


def accuracy(mixture, samples: torch.Tensor, labels: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    return float((mixture.posterior(samples).argmax(1) == labels).double().mean())


def _process(factory):  # type: ignore[no-untyped-def]
    return VE(sigma_min=0.01, sigma_max=20.0) if factory is VE else factory()


def exact_classifier(mixture, process) -> TrainedModel:  # type: ignore[no-untyped-def]
    """The exact noisy classifier, handed over as a trained model (as a spec would)."""
    return TrainedModel.from_diffusion(Diffusion(process, ExactClassifierNetwork(mixture, process),
                                                 device="cpu"))


def conditional_model(mixture, process, prediction: str = "eps") -> ScoreModel:  # type: ignore[no-untyped-def]
    return ScoreModel(process, ExactConditionalNetwork(mixture, process, prediction))


SOLVERS = [
    ("ancestral", Ancestral, {}, DDPM),
    ("ddim", DDIM, {}, DDPM),
    ("predictor-corrector", PredictorCorrector, {}, VP),
    ("dpm-solver-2m", DPMSolver2M, {}, VP),
    ("heun", HeunODE, {}, VE),
]
IDS = [case[0] for case in SOLVERS]


def draw(solver, model: ScoreModel, guidance, labels: torch.Tensor, seed: int = 3):  # type: ignore[no-untyped-def]
    view = model.guided(guidance, labels)
    return solver.sample(view, (len(labels), 2), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("label", "solver", "settings", "process"), SOLVERS, ids=IDS)
def test_classifier_guidance_with_the_exact_classifier_samples_the_conditional(
        label, solver, settings, process):
    process = _process(process)
    model = exact_model(MIXTURE, process)  # the unconditional score
    term = ClassifierGuidance(exact_classifier(MIXTURE, process), scale=1.0)
    assert term.check(model) is None
    samples = draw(solver(**settings), model, [term], LABELS).samples
    assert swd_ratio(samples) < FACTOR, label
    assert accuracy(MIXTURE, samples, LABELS) >= 0.99, label


@pytest.mark.parametrize(("label", "solver", "settings", "process"), SOLVERS, ids=IDS)
def test_classifier_free_at_w1_samples_the_conditional(label, solver, settings, process):
    model = conditional_model(MIXTURE, _process(process))
    samples = draw(solver(**settings), model, [ClassifierFree(scale=1.0)], LABELS).samples
    assert swd_ratio(samples) < FACTOR, label
    assert accuracy(MIXTURE, samples, LABELS) >= 0.99, label


def test_the_comparison_has_power():
    """Unguided samples (labels ignored: the unconditional model) fail both criteria."""
    model = exact_model(MIXTURE, VP())
    samples = draw(DPMSolver2M(), model, [], LABELS).samples
    assert swd_ratio(samples) > 3 * FACTOR
    assert accuracy(MIXTURE, samples, LABELS) < 0.6


def test_classifier_free_above_one_sharpens_and_is_not_the_posterior():
    """``w > 1`` tilts towards the class (``p(x) p(y | x)^w``-like): on two overlapping modes
    the requested class becomes more certain with ``w``, and the samples leave the true
    conditional distribution, by far more than its noise floor."""
    mixture = overlapping_modes()
    labels = torch.zeros(N, dtype=torch.long)
    reference, floor = _reference(mixture, labels)
    model = conditional_model(mixture, VP())
    certainty, distance = [], []
    for w in (1.0, 2.0, 4.0):
        samples = draw(DPMSolver2M(steps=30), model, [ClassifierFree(scale=w)], labels).samples
        certainty.append(float(mixture.posterior(samples)[:, 0].mean()))
        distance.append(sliced_wasserstein(samples, reference, DIRECTIONS) / floor)
    assert certainty[0] < certainty[1] < certainty[2]
    assert certainty[0] < 0.92 and certainty[2] > 0.99  # measured: 0.899, 0.999
    assert distance[0] < FACTOR  # w = 1: the conditional
    assert distance[2] > 4 * FACTOR  # w = 4: something else (sharper)


def test_classifier_scale_above_one_sharpens_too():
    mixture = overlapping_modes()
    process = VP()
    labels = torch.zeros(N, dtype=torch.long)
    model = exact_model(mixture, process)
    classifier = exact_classifier(mixture, process)
    certainty = []
    for s in (1.0, 4.0):
        samples = draw(DPMSolver2M(steps=30), model, [ClassifierGuidance(classifier, s)],
                       labels).samples
        certainty.append(float(mixture.posterior(samples)[:, 0].mean()))
    assert certainty[0] < 0.92 and certainty[1] > 0.99


def test_exact_classifier_free_at_w_is_exact_classifier_guidance_at_s_equal_w():
    """With exact pieces, ``eps_u + w (eps_c - eps_u)`` is ``score_u + w grad log p(y | x_t)``:
    the two routes (a batched network call vs. a backward pass) must agree for any w."""
    process = VE(sigma_min=0.01, sigma_max=20.0)
    x = 3 * torch.randn(12, 2, generator=torch.Generator().manual_seed(6)).double()
    t = torch.linspace(0.02, 0.98, 12).double()
    labels = torch.arange(12) % 3
    classifier = exact_classifier(MIXTURE, process)
    for w in (0.0, 0.5, 2.0, 7.0):
        free = conditional_model(MIXTURE, process).guided([ClassifierFree(w)], labels)
        guided = exact_model(MIXTURE, process).guided([ClassifierGuidance(classifier, w)], labels)
        assert torch.allclose(free.score(x, t), guided.score(x, t), rtol=1e-6, atol=1e-6), w


@pytest.mark.parametrize("host", [True, False], ids=["host-decision", "device-mask"])
@pytest.mark.parametrize("solver", [Ancestral(), DDIM(steps=20), HeunODE(steps=10)],
                         ids=["ancestral", "ddim", "heun"])
def test_an_interval_that_excludes_every_step_is_bit_identical(solver, host, monkeypatch):
    """Both the CPU decision and the accelerator's per-sample selection (forced here)."""
    monkeypatch.setattr(guidance_base, "decide_on_host", lambda x: host)
    process = DDPM() if isinstance(solver, Ancestral) else VP()
    labels = LABELS[::10]
    never = (1e6, 2e6)  # no process here gets this noisy
    conditional = conditional_model(MIXTURE, process)
    plain = draw(solver, conditional, [], labels).samples
    for term in (ClassifierFree(scale=4.0, interval=never),
                 ClassifierGuidance(exact_classifier(MIXTURE, process), 2.0, interval=never)):
        guided = draw(solver, conditional, [term], labels).samples
        assert torch.equal(guided, plain), type(term).__name__
    # and an interval that includes every step is the guidance itself
    always = (0.0, float("inf"))
    a = draw(solver, conditional, [ClassifierFree(scale=4.0, interval=always)], labels).samples
    b = draw(solver, conditional, [ClassifierFree(scale=4.0)], labels).samples
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain)


def test_a_partial_interval_guides_inside_only():
    """Per-sample selection: rows at different noise levels inside and outside the interval."""
    process = VP()
    model = conditional_model(MIXTURE, process)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.5, 0.95, 0.05, 0.5, 0.95])
    level = guidance_base.noise_level(model, t)
    lo, hi = float(level[1]) * 0.9, float(level[1]) * 1.1  # only t = 0.5 inside
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    inside = model.guided([ClassifierFree(3.0)], labels).predict(x, t, "eps")
    outside = model.guided([], labels).predict(x, t, "eps")
    windowed = model.guided([ClassifierFree(3.0, interval=(lo, hi))], labels).predict(x, t, "eps")
    mask = torch.tensor([False, True, False, False, True, False])
    assert torch.allclose(windowed[mask], inside[mask])
    assert torch.equal(windowed[~mask], outside[~mask])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_guidance_is_the_same_score_in_every_parameterisation(prediction):
    """CFG combines in the network's own parameterisation and a gradient term converts its
    increment: both must give the same guided score whatever the network predicts."""
    process = VP()
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(1)).double()
    t = torch.linspace(0.05, 0.95, 9).double()
    labels = torch.arange(9) % 3
    classifier = exact_classifier(MIXTURE, process)
    terms = [ClassifierFree(2.5), ClassifierGuidance(classifier, 1.5)]
    reference = conditional_model(MIXTURE, process, "eps").guided(terms, labels).score(x, t)
    other = conditional_model(MIXTURE, process, prediction).guided(terms, labels).score(x, t)
    assert torch.allclose(other, reference, rtol=1e-6, atol=1e-6)
    # and the gradient term is Bayes' rule: score(x | y) = score(x) + grad log p(y | x)
    alpha, sigma = process.marginal(t)
    exact = MIXTURE.component_score(x, alpha, sigma, labels)
    bayes = exact_model(MIXTURE, process, prediction).guided(
        [ClassifierGuidance(classifier, 1.0)], labels).score(x, t)
    assert torch.allclose(bayes, exact, rtol=1e-6, atol=1e-6)


def test_classifier_free_is_one_batched_call_without_autograd():
    seen: list[tuple[int, bool]] = []
    model = conditional_model(MIXTURE, VP())
    model.network.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].shape[0], torch.is_grad_enabled())))
    result = draw(DDIM(steps=10), model, [ClassifierFree(3.0)], LABELS[:50])
    assert result.nfe == 10
    assert seen == [(100, False)] * 10  # one doubled batch per step, autograd off


def test_classifier_guidance_differentiates_the_classifier_only():
    process = VP()
    model = exact_model(MIXTURE, process)
    classifier = exact_classifier(MIXTURE, process)
    term = ClassifierGuidance(classifier, 1.0)
    network_grad: list[bool] = []
    classifier_grad: list[bool] = []
    model.network.register_forward_pre_hook(
        lambda module, args: network_grad.append(torch.is_grad_enabled()))
    term.network().register_forward_pre_hook(
        lambda module, args: classifier_grad.append(args[0].requires_grad))
    draw(DDIM(steps=5), model, [term], LABELS[:20])
    assert network_grad == [False] * 5 and classifier_grad == [True] * 5


def test_rescale_matches_the_conditional_spread():
    """phi = 1: the guided x0 has the conditional x0's per-sample std; phi = 0: plain CFG."""
    process = VP()
    model = conditional_model(MIXTURE, process)
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(2))
    t = torch.full((12,), 0.6)
    labels = torch.arange(12) % 3
    plain = model.guided([ClassifierFree(5.0)], labels).predict(x, t, "x0")
    off = model.guided([ClassifierFree(5.0, rescale=0.0)], labels).predict(x, t, "x0")
    full = model.guided([ClassifierFree(5.0, rescale=1.0)], labels).predict(x, t, "x0")
    half = model.guided([ClassifierFree(5.0, rescale=0.5)], labels).predict(x, t, "x0")
    conditional = model.guided([], labels).predict(x, t, "x0")
    assert torch.equal(off, plain)
    assert torch.allclose(full.std(1), conditional.std(1), rtol=1e-4)
    assert torch.allclose(half, 0.5 * (full + plain), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(full, plain)


def test_terms_add_up():
    """Two gradient terms of scale a and b are one of scale a + b."""
    process = VP()
    model = exact_model(MIXTURE, process)
    classifier = exact_classifier(MIXTURE, process)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    t = torch.full((8,), 0.4)
    labels = torch.arange(8) % 3
    two = model.guided([ClassifierGuidance(classifier, 0.5), ClassifierGuidance(classifier, 1.5)],
                       labels).score(x, t)
    one = model.guided([ClassifierGuidance(classifier, 2.0)], labels).score(x, t)
    assert torch.allclose(two, one, rtol=1e-5, atol=1e-5)


def test_a_plugin_gradient_term_is_one_class():
    """A third-party term subclasses GradientGuidance and implements ``gradient`` only: here a
    pull towards a point, whose Bayes-rule result is known in closed form for a Gaussian."""

    class Towards(GradientGuidance):
        def gradient(self, model, x, t, y):  # type: ignore[no-untyped-def]
            return -x  # grad of log N(x; 0, I): guidance by a standard normal "likelihood"

    process = VP()
    model = exact_model(MIXTURE, process)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(5))
    t = torch.full((5,), 0.3)
    guided = model.guided([Towards(scale=2.0)]).score(x, t)
    assert torch.allclose(guided, model.score(x, t) - 2.0 * x, rtol=1e-5, atol=1e-6)
    assert Towards().needs_labels  # the default; a term that needs none says so


def test_guided_views_leave_the_model_untouched():
    """Guided sampling is sampling only: the Diffusion's own model (used by the likelihood)
    keeps no guidance and no labels."""
    process = VP()
    diffusion = Diffusion(process, ExactConditionalNetwork(MIXTURE, process), device="cpu")
    result = diffusion.sample(30, DDIM(steps=5), labels="all",
                              guidance=[ClassifierFree(3.0)], batch_size=7)
    assert diffusion.model.guidance == () and diffusion.model.labels is None
    assert torch.equal(result.labels, requested_labels("all", 30, 3))
    # per-sample streams: the batch size changes nothing, labels included
    again = diffusion.sample(30, DDIM(steps=5), labels="all", guidance=[ClassifierFree(3.0)])
    assert torch.allclose(result.samples, again.samples, atol=1e-6)


def test_diffusion_sample_checks_guidance_and_labels():
    process = VP()
    unconditional = Diffusion(process, exact_model(MIXTURE, process).network, device="cpu")
    with pytest.raises(ValueError, match="class-conditional"):
        unconditional.sample(4, DDIM(steps=2), labels=0, guidance=[ClassifierFree()])
    conditional = Diffusion(process, ExactConditionalNetwork(MIXTURE, process), device="cpu")
    with pytest.raises(ValueError, match="needs labels"):
        conditional.sample(4, DDIM(steps=2), guidance=[ClassifierFree()])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        conditional.sample(4, DDIM(steps=2), labels=[0, 5])
    # an unconditional network with a classifier: the classifier's classes are the labels
    classifier = ClassifierGuidance(exact_classifier(MIXTURE, process))
    result = unconditional.sample(6, DDIM(steps=2), labels="all", guidance=[classifier])
    assert result.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_requested_labels():
    assert requested_labels(None, 5) is None
    assert requested_labels("all", 20, 10).tolist() == [c for c in range(10) for _ in range(2)]
    assert requested_labels(3, 4, 10).tolist() == [3, 3, 3, 3]
    assert requested_labels([7, 1], 5, 10).tolist() == [7, 7, 7, 1, 1]
    assert requested_labels("all", 4, 3).tolist() == [0, 0, 1, 2]
    with pytest.raises(ValueError, match=r"0\.\.9"):
        requested_labels([10], 4, 10)
    with pytest.raises(ValueError, match="classes"):
        requested_labels("all", 4, None)


def _solver_and_process(name: str):  # type: ignore[no-untyped-def]
    solver = get_registry().build("solver", {"kind": name})
    if solver.samples_from == "consistency":  # testing.check_solver checks its guidance
        pytest.skip(f"{name} samples a consistency function, which the exact mixture lacks in "
                    "closed form")
    for process in (DDPM(), VP(), VE(sigma_min=0.01, sigma_max=20.0),
                    VE(sigma_min=0.01, sigma_max=8.0, num_levels=10)):
        if solver.check(process) is None:
            return solver, process
    pytest.skip(f"{name}: none of the test processes suits it")


@pytest.mark.parametrize("name", [c.name for c in get_registry().components("solver")])
def test_every_registered_solver_samples_with_guidance(name):
    """Over the registry (a plugin's solver is covered too): classifier-free guidance at w = 1
    reproduces conditional sampling, and the guided samples land in their requested class."""
    solver, process = _solver_and_process(name)
    model = conditional_model(MIXTURE, process)
    labels = requested_labels("all", 60, 3)
    plain = draw(solver, model, [], labels).samples
    guided = draw(solver, model, [ClassifierFree(scale=1.0)], labels).samples
    assert torch.isfinite(guided).all()
    assert torch.allclose(guided, plain, atol=1e-3), name
    sharp = draw(solver, model, [ClassifierFree(scale=3.0)], labels).samples
    assert accuracy(MIXTURE, sharp, labels) >= 0.95, name
