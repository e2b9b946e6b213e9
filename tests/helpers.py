"""Small shared helpers for the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusers_kit.cli.main import main

TINY_SPEC = """\
name: tiny
seed: 3
device: cpu
data: {kind: digits}
process:
  kind: ve
  sigma_min: 0.01
  sigma_max: 8.0
  num_levels: 4
network: {kind: ncsn, channels: 8, blocks: 1}
objective: {kind: dsm}
train:
  steps: 6
  batch_size: 32
  log_every: 3
  optimizer: {kind: adam, lr: 0.001}
sample:
  n: 12
  solver: {kind: annealed_langevin, steps_per_level: 2, epsilon: 5.0e-5}
evaluate:
  metrics:
    - {kind: swd, projections: 64}
output:
  root: {root}
"""


def write_spec(tmp_path: Path, text: str | None = None, name: str = "spec.yaml") -> Path:
    """Write a spec (the tiny one by default) whose runs go under ``tmp_path/runs``."""
    text = TINY_SPEC if text is None else text
    path = tmp_path / name
    path.write_text(text.replace("{root}", str(tmp_path / "runs")), encoding="utf-8")
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def gaussian_score(sigma_data: float):  # type: ignore[no-untyped-def]
    """Exact score of N(0, sigma_data^2 I) noised by x_t = alpha x0 + sigma eps."""

    def score(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        var = alpha**2 * sigma_data**2 + sigma**2
        return -x / var

    return score


def word_tokenizer(words: list[str]):  # type: ignore[no-untyped-def]
    """A Hugging Face fast tokenizer over ``words`` (lower-cased, split on whitespace), with
    ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2 and ``[EOS]`` 3 wrapped around each text: built
    locally for the tiny random CLIP models of the tests, nothing is downloaded."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
        eos_token="[EOS]")
