"""The feature network's two faces, features and logits, and the metrics that use them.

A small digit classifier is trained in the test (a few seconds on one core); the held-out
accuracy the classifier spec records (metric ``accuracy``) and the class accuracy of real
held-out digits judged by the same network as a feature model (``class_accuracy``) are one
number reached by two routes.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_kit import Diffusion
from diffusers_kit.data import Digits
from diffusers_kit.metrics import Accuracy, ClassAccuracy, FrechetDistance
from diffusers_kit.networks import NCSN, NoiseAwareClassifier
from diffusers_kit.objectives import DenoisingScoreMatching, NoisyClassification
from diffusers_kit.pipeline import TrainedModel
from diffusers_kit.processes import VE
from diffusers_kit.spec.errors import SpecError


@pytest.fixture(scope="module")
def digits():
    return Digits().load()


@pytest.fixture(scope="module")
def classifier(digits):
    torch.manual_seed(0)
    network = NoiseAwareClassifier(num_classes=10, channels=8, channel_mult=[1, 2],
                                   data_shape=(1, 8, 8))
    diffusion = Diffusion(VE(sigma_min=0.01, sigma_max=1.0), network,
                          NoisyClassification(time=0.0), device="cpu")
    return diffusion.fit(digits, steps=150, batch_size=64, ema_decay=0.9, seed=0, log_every=50)


def test_features_are_what_the_logits_are_a_linear_map_of():
    torch.manual_seed(1)
    for shape in ((1, 8, 8), (5,)):
        network = NoiseAwareClassifier(num_classes=4, channels=8, data_shape=shape)
        x, t = torch.randn(6, *shape), torch.rand(6)
        h = network.features(x, t)
        assert h.shape == (6, network.head.in_features)
        torch.testing.assert_close(network(x, t), network.head(h))


def test_class_accuracy_of_real_heldout_digits_equals_the_networks_heldout_accuracy(
        classifier, digits):
    generator = torch.Generator().manual_seed(0)
    with classifier.sampling_weights() as model:
        accuracy = Accuracy().evaluate(None, digits, generator, model)
    judged = ClassAccuracy(TrainedModel.from_diffusion(classifier, digits))
    real = judged.score(digits.heldout, digits.heldout_labels)
    assert accuracy["accuracy"] > 0.8  # a trained classifier, not chance (0.1)
    assert real["class_accuracy"] == accuracy["accuracy"]
    assert accuracy["accuracy_low"] < accuracy["accuracy"] < accuracy["accuracy_high"]
    # the per-class table, weighted by each class's count, is the overall accuracy
    counts = torch.bincount(digits.heldout_labels, minlength=10).double()
    per_class = torch.tensor([real[f"class_accuracy_{c}"] for c in range(10)],
                             dtype=torch.float64)
    assert float((per_class * counts).sum() / counts.sum()) == pytest.approx(
        real["class_accuracy"])


def test_class_accuracy_with_requested_labels_and_the_class_balance_without(
        classifier, digits):
    judged = ClassAccuracy(TrainedModel.from_diffusion(classifier, digits), resamples=200)
    generator = torch.Generator().manual_seed(0)
    predicted = judged.space.predict(digits.heldout)
    # samples "requested" as the labels the judge gives them: accuracy 1, floor the real one
    out = judged.evaluate(digits.heldout, digits, generator, labels=predicted)
    assert out["class_accuracy"] == 1.0
    assert out["class_accuracy_floor"] == judged.score(
        digits.heldout, digits.heldout_labels)["class_accuracy"]
    # unconditional samples: real training digits are balanced like the held-out ones;
    # only zeros and ones are far off (total variation 1 - share of 0 and 1 in the data)
    real = judged.evaluate(digits.train[:300], digits, generator)
    assert real["class_tv"] <= real["class_tv_floor_high"]
    few = digits.train[(digits.train_labels <= 1)][:300]
    skewed = judged.evaluate(few, digits, generator)
    assert skewed["class_tv"] > 0.6 and skewed["class_tv_low"] > real["class_tv_floor_high"]


def test_accuracy_at_a_noise_level_is_lower_than_on_clean_digits(classifier, digits):
    generator = torch.Generator().manual_seed(0)
    with classifier.sampling_weights() as model:
        clean = Accuracy(time=0.0).evaluate(None, digits, generator, model)
        noisy = Accuracy(time=1.0).evaluate(None, digits, generator, model)
    # sigma(1) = 1 on pixels in [-1, 1]: a clean classifier loses most of its accuracy
    assert noisy["accuracy"] < clean["accuracy"] - 0.2
    assert Accuracy.needs_samples is False


def test_a_feature_model_that_is_no_classifier_is_refused(digits):
    torch.manual_seed(0)
    denoiser = Diffusion(VE(), NCSN(channels=8, blocks=1, data_shape=(1, 8, 8)),
                         DenoisingScoreMatching(), device="cpu")
    with pytest.raises(ValueError, match="features must name a classifier model"):
        FrechetDistance(TrainedModel.from_diffusion(denoiser, digits))


def test_samples_of_another_shape_or_scale_are_a_spec_error_naming_features(classifier, digits):
    metric = FrechetDistance(TrainedModel.from_diffusion(classifier, digits), resamples=0)
    with pytest.raises(SpecError) as shape:
        metric.evaluate(torch.zeros(10, 1, 4, 4), digits, torch.Generator().manual_seed(0))
    assert "evaluate.metrics.fd.features" in shape.value.issues[0].field
    assert "(1, 4, 4)" in shape.value.issues[0].expected
    unit = Digits(scale="unit").load()  # pixels in [0, 1]: another scale than [-1, 1]
    with pytest.raises(SpecError) as scale:
        metric.evaluate(unit.train[:50], unit, torch.Generator().manual_seed(0))
    assert "scaled like this run's" in scale.value.issues[0].expected
