"""The CLIP score (diffusers_kit.metrics.clip) from a local CLIP folder built offline: a tiny
random CLIPModel, a word-level tokenizer and an image processor, saved with save_pretrained."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.clip import CLIPScore
from tests.helpers import word_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["a", "handwritten", "zero", "one", "two", "three", "four", "five", "six", "seven",
         "eight", "nine"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    fast = word_tokenizer(WORDS)
    vocab = fast.get_vocab()
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 16, "pad_token_id": 0, "bos_token_id": 2,
                     "eos_token_id": 3},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2},
        projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    model = transformers.CLIPModel(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model.eval(), fast


def digits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def test_clip_cosines_are_those_of_the_models_own_logits_and_the_score_clips_them(clip_folder):
    folder, model, tokenizer = clip_folder
    metric = CLIPScore(path=str(folder))
    x, labels = digits(5, 0), torch.tensor([0, 3, 7, 7, 9])
    cosines, scores = metric.cosines(x, labels), metric.score(x, labels)
    # independent route: CLIPModel's forward, logits_per_image = exp(logit_scale) cos
    images = ((x + 1) / 2 * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    pixels = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={
        "height": 32, "width": 32})(images=list(images), input_data_format="channels_first",
                                      return_tensors="pt")["pixel_values"]
    captions = [f"a handwritten {['zero', 'three', 'seven', 'seven', 'nine'][i]}"
                for i in range(5)]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels).logits_per_image
    cos = logits.diagonal().double() / model.logit_scale.exp().double()
    assert cos.abs().min() > 1e-3  # a sharp comparison: no cosine near 0
    torch.testing.assert_close(cosines, cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, 100 * cosines.clamp(min=0), rtol=0, atol=0)


def test_clip_score_reports_value_floor_interval_and_needs_labels(clip_folder):
    folder, _, _ = clip_folder
    metric = CLIPScore(path=str(folder), resamples=200)
    data = DataSplits(train=digits(6, 1), heldout=digits(6, 2),
                      heldout_labels=torch.tensor([0, 1, 2, 3, 4, 5]))
    out = metric.evaluate(digits(4, 3), data, torch.Generator().manual_seed(0),
                          labels=torch.tensor([1, 1, 2, 8]))
    assert out["clip_score_low"] <= out["clip_score"] <= out["clip_score_high"]
    assert out["clip_score_floor"] == pytest.approx(
        float(metric.score(data.heldout, data.heldout_labels).mean()))
    assert out["clip_score_n"] == 4
    with pytest.raises(ValueError, match="class-conditional"):
        metric.evaluate(digits(4, 3), data, torch.Generator().manual_seed(0))


def test_a_folder_without_a_clip_model_is_refused_with_its_path(tmp_path):
    with pytest.raises(ValueError, match=r"path: .*not a Hugging Face model folder"):
        CLIPScore(path=str(tmp_path))
