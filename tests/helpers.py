"""Small shared helpers for the tests."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import torch
import yaml

from diffusers_kit.cli.main import main
from diffusers_kit.run_folder import run_folders

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


#: a two-moons spec that trains, samples and evaluates in about a second
MOONS_SPEC = """\
name: tiny
seed: 1
device: cpu
data: {kind: two_moons, n_train: 256, n_heldout: 64}
process: {kind: ve, sigma_min: 0.01, sigma_max: 2.0, num_levels: 4}
network: {kind: mlp, width: 16, blocks: 1}
objective: {kind: dsm}
train:
  steps: 8
  batch_size: 32
  log_every: 4
  optimizer: {kind: adam, lr: 0.001}
sample:
  n: 16
  solver: {kind: annealed_langevin, steps_per_level: 2, epsilon: 1.0e-4}
evaluate:
  metrics: [{kind: swd, projections: 16}]
output:
  root: {root}
"""


def write_spec(tmp_path: Path, text: str | None = None, name: str = "spec.yaml") -> Path:
    """Write a spec (the tiny one by default) whose runs go under ``tmp_path/runs``."""
    text = TINY_SPEC if text is None else text
    path = tmp_path / name
    path.write_text(text.replace("{root}", str(tmp_path / "runs")), encoding="utf-8")
    return path


def run_dirs(root: Path, name: str = "tiny") -> list[Path]:
    """The run folders of spec ``name`` under ``root/runs``, oldest first."""
    return run_folders(root / "runs", name)


def finished_run(base: Path, text: str) -> tuple[Path, Path]:
    """``text`` written as a spec under ``base`` and run to the end: (spec, run folder)."""
    spec = write_spec(base, text)
    assert main(["run", str(spec), "--quiet"]) == 0
    (run_dir,) = run_dirs(base, yaml.safe_load(spec.read_text(encoding="utf-8"))["name"])
    return spec, run_dir


def copy_run(run_dir: Path, tmp_path: Path, text: str) -> tuple[Path, Path]:
    """A copy of the finished ``run_dir`` under ``tmp_path/runs``, with ``text`` written as the
    spec beside it: (spec, copied run folder)."""
    target = tmp_path / "runs" / run_dir.parent.name / run_dir.name
    shutil.copytree(run_dir, target, symlinks=True)
    return write_spec(tmp_path, text), target


#: the repository's root (the working directory of child processes)
ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The environment of a child process: one torch thread, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(module: str, *args: str, nproc: int = 2) -> list[str]:
    """The command that runs ``python -m module args`` as ``nproc`` ranks of one node under
    torchrun, its rendezvous on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module,
            *args]


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
