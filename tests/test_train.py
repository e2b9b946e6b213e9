"""The training engine: schedules, accumulation, divergence, precision, Ctrl-C and SIGKILL
followed by a bit-identical resume, and data parallelism over two CPU processes."""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_kit import VE, Adam, Diffusion, hookimpl
from diffusers_kit.cli.main import main
from diffusers_kit.data import TwoMoons
from diffusers_kit.networks import MLP
from diffusers_kit.objectives import DenoisingScoreMatching
from diffusers_kit.objectives.base import Objective
from diffusers_kit.pipeline import run_folders
from diffusers_kit.registry import get_plugin_manager
from diffusers_kit.train import EMA, TrainingDiverged, TrainSettings, learning_rate_factor
from tests.helpers import ROOT, child_env, run_cli
from tests.helpers import torchrun as torchrun_command

MOONS = """\
name: moons
seed: 1
device: cpu
data: {{kind: two_moons, n_train: 512, n_heldout: 128}}
process: {{kind: ve, sigma_min: 0.05, sigma_max: 4.0, num_levels: 5}}
network: {{kind: mlp, width: 16, blocks: 1, dropout: 0.1}}
objective: {{kind: dsm}}
train:
  steps: {steps}
  batch_size: 32
  log_every: 5
  checkpoint_every: 20
  lr_schedule: cosine
  warmup_steps: 10
  optimizer: {{kind: adamw, lr: 0.003}}
sample:
  n: 16
  solver: {{kind: annealed_langevin, steps_per_level: 2, epsilon: 1.0e-3}}
evaluate:
  metrics: [{{kind: swd, projections: 16}}]
output: {{root: {root}}}
"""


def moons_spec(tmp_path: Path, steps: int = 120, name: str = "moons.yaml") -> Path:
    path = tmp_path / name
    path.write_text(MOONS.format(steps=steps, root=tmp_path / "runs"), encoding="utf-8")
    return path


def run_dirs(tmp_path: Path) -> list[Path]:
    return run_folders(tmp_path / "runs", "moons")


def checkpoint_step(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["training"])["train_step"]


def child(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.train_child", *args], cwd=ROOT,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- schedule and accumulation -----------------------------------------------------------------
def test_warmup_then_cosine_reaches_the_floor_at_the_last_step():
    settings = TrainSettings(steps=110, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    factors = [learning_rate_factor(s, settings) for s in range(1, 111)]
    assert factors[:10] == pytest.approx([s / 10 for s in range(1, 11)])
    assert factors[59] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    constant = TrainSettings(steps=50, warmup_steps=4)
    assert [learning_rate_factor(s, constant) for s in (2, 4, 5, 50)] == [0.5, 1, 1, 1]


def test_the_ema_is_the_normalised_average_of_the_trained_weights_only():
    """a_k = sum_j decay^(k-j) (1 - decay) p_j / (1 - decay^k), computed here in closed form
    from the parameter sequence; the initial weights carry no weight (before the bias
    correction they kept decay^k of it)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    ema, decay = EMA(module, 0.9), 0.9
    history = []
    for k in range(1, 8):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in module.parameters()])
        ema.update(module, k)
        norm = 1 - decay**k
        for i, shadow in enumerate(ema.shadow):
            expected = sum(decay ** (k - j) * (1 - decay) * history[j - 1][i]
                           for j in range(1, k + 1)) / norm
            torch.testing.assert_close(shadow, expected, rtol=1e-5, atol=1e-6)


def test_after_one_step_the_ema_weights_are_the_trained_weights():
    torch.manual_seed(0)
    model = Diffusion(VE(), MLP(width=16, blocks=1, data_shape=(2,)), DenoisingScoreMatching(),
                      device="cpu")
    initial = {k: v.clone() for k, v in model.network.state_dict().items()}
    model.fit(TwoMoons(n_train=64, n_heldout=8).load(), steps=1, batch_size=16,
              optimizer=Adam(lr=0.01), ema_decay=0.999, log_every=1)
    averaged, trained = model.sampling_state(), model.network.state_dict()
    assert not torch.equal(trained["out.weight"], initial["out.weight"])
    for key in trained:
        torch.testing.assert_close(averaged[key], trained[key], rtol=0, atol=1e-7)


class Reconstruct(Objective):
    """A loss with no randomness, so micro-batching changes nothing but the summation order."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor | None] = []

    def loss(self, model, x0, generator=None, labels=None):
        self.seen.append(labels)
        t = torch.full((x0.shape[0],), 0.5)
        return (model(x0, t, labels) - x0).pow(2).sum(1).mean()


def test_two_accumulated_micro_batches_make_the_step_of_one_batch_twice_as_big():
    data = TwoMoons(n_train=64, n_heldout=8).load()
    results = []
    for batch, accumulate in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        model = Diffusion(VE(), MLP(width=16, blocks=1, data_shape=(2,)), Reconstruct(),
                          device="cpu")
        model.fit(data, steps=3, batch_size=batch, grad_accumulation=accumulate,
                  optimizer=Adam(lr=0.01), ema_decay=0.0, grad_clip=None, log_every=1)
        results.append((model.network.state_dict(), model.train_log.losses))
    (one, losses_one), (two, losses_two) = results
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)
    assert losses_one == pytest.approx(losses_two, rel=1e-5)
    assert not torch.equal(one["out.weight"], MLP(width=16, blocks=1, data_shape=(2,))
                           .state_dict()["out.weight"])


def test_class_labels_reach_a_class_conditional_network():
    from diffusers_kit.data import Digits
    from diffusers_kit.networks import UNet

    objective = Reconstruct()
    unet = UNet(channels=8, channel_mult=[1], attention_resolutions=[], num_classes=10,
                data_shape=(1, 8, 8))
    data = Digits().load()
    Diffusion(VE(), unet, objective, device="cpu").fit(data, steps=2, batch_size=4)
    assert all(labels is not None and labels.shape == (4,) for labels in objective.seen)
    assert set(torch.cat(objective.seen).tolist()) <= set(range(10))


# -- divergence --------------------------------------------------------------------------------
class PoisonAt(DenoisingScoreMatching):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.calls, self.step = 0, step

    def loss(self, model, x0, generator=None, labels=None):
        self.calls += 1
        loss = super().loss(model, x0, generator, labels)
        return loss * math.nan if self.calls >= self.step else loss


def test_a_nan_loss_names_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    data = TwoMoons(n_train=256, n_heldout=8).load()
    model = Diffusion(VE(), MLP(width=8, blocks=1, data_shape=(2,)), PoisonAt(13), device="cpu")
    path = tmp_path / "checkpoint.safetensors"
    saved = []

    def save(step):
        model.step = step
        model.save(path)
        saved.append(step)

    with pytest.raises(TrainingDiverged, match=r"at step 13 .*step 10\) is kept"):
        model.fit(data, steps=40, batch_size=16, log_every=5, checkpoint_every=10,
                  on_checkpoint=save)
    assert saved == [10] and checkpoint_step(path) == 10
    assert all(torch.isfinite(v).all() for v in training_tensors(path).values())


def test_nan_stops_the_cli_with_exit_1_and_a_message(tmp_path, capsys):
    spec = moons_spec(tmp_path, steps=30)
    manager = get_plugin_manager()

    class Poison:
        @hookimpl
        def dkit_run_started(self, run):
            run.components.diffusion.objective = PoisonAt(23)

    poison = Poison()
    manager.register(poison)
    try:
        code, _, err = run_cli(["run", str(spec), "--quiet"], capsys)
    finally:
        manager.unregister(poison)
    assert code == 1
    text = " ".join(err.split())
    assert "NaN or infinite at step 23" in text and "step 20) is kept" in text
    (run_dir,) = run_dirs(tmp_path)
    assert checkpoint_step(run_dir / "checkpoint.safetensors") == 20


# -- precision -------------------------------------------------------------------------------
def test_fp16_on_a_cpu_is_a_spec_error(tmp_path, capsys):
    code, _, err = run_cli(["run", str(moons_spec(tmp_path)), "train.precision=fp16"], capsys)
    assert code == 2 and "train.precision" in err and "needs CUDA" in " ".join(err.split())
    assert not run_dirs(tmp_path)


def test_compile_with_a_twice_differentiating_objective_is_a_spec_error(tmp_path, capsys):
    code, _, err = run_cli(["run", str(moons_spec(tmp_path)), "train.compile=true",
                            "objective.kind=ism"], capsys)
    assert code == 2 and "train.compile" in err and "differentiates twice" in " ".join(err.split())


def test_bf16_autocast_trains_on_the_cpu():
    torch.manual_seed(0)
    data = TwoMoons(n_train=256, n_heldout=8).load()
    model = Diffusion(VE(), MLP(width=16, blocks=1, data_shape=(2,)), DenoisingScoreMatching(),
                      device="cpu")
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    model.fit(data, steps=5, batch_size=32, precision="bf16", log_every=5)
    assert math.isfinite(model.train_log.losses[-1])
    assert all(v.dtype == torch.float32 for v in model.network.state_dict().values())
    assert not torch.equal(before["out.weight"], model.network.state_dict()["out.weight"])


# -- kill, interrupt, resume ------------------------------------------------------------------
def training_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items()
            if k.startswith(("network.", "ema.", "train.optim."))}


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_run_resumes_to_the_bits_of_an_uninterrupted_one(tmp_path, capsys, how):
    spec = moons_spec(tmp_path)
    process = child(["--slow", "0.05", "--", "run", str(spec), "--quiet"])
    try:
        deadline = time.monotonic() + 120
        while not any((d / "checkpoint.safetensors").exists() for d in run_dirs(tmp_path)):
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        process.send_signal(getattr(signal, how))
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    (killed,) = run_dirs(tmp_path)
    step = checkpoint_step(killed / "checkpoint.safetensors")
    assert 0 < step < 120, "the child must die mid-run"
    if how == "SIGINT":
        assert process.returncode == 130
        assert "--resume" in err.decode() and str(killed) in " ".join(err.decode().split())
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (killed / "samples.png").exists()

    code, _, err = run_cli(["run", str(spec), "--resume", str(killed), "--quiet"], capsys)
    assert code == 0, err
    assert f"resuming from step {step}" in (killed / "run.log").read_text()
    code, _, err = run_cli(["run", str(spec), "--quiet"], capsys)
    assert code == 0, err
    (straight,) = [d for d in run_dirs(tmp_path) if d != killed]
    resumed = training_tensors(killed / "checkpoint.safetensors")
    reference = training_tensors(straight / "checkpoint.safetensors")
    assert resumed.keys() == reference.keys() and len(resumed) > 10
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
    assert checkpoint_step(killed / "checkpoint.safetensors") == 120
    with open(killed / "metrics.json") as a, open(straight / "metrics.json") as b:
        assert json.load(a)["swd"] == json.load(b)["swd"]


def test_resume_refuses_a_different_spec_or_a_missing_folder(tmp_path, capsys):
    spec = moons_spec(tmp_path, steps=20)
    assert run_cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    (first,) = run_dirs(tmp_path)
    code, _, err = run_cli(["run", str(spec), "--resume", str(first), "network.width=8"], capsys)
    assert code == 2 and "network.width" in err
    code, _, err = run_cli(["run", str(spec), "--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and "--resume" in err
    # a finished run trains on when train.steps grows, in a new run folder (issue 29: a
    # finished run is never changed)
    code, _, err = run_cli(["run", str(spec), "--resume", str(first), "train.steps=25",
                            "--quiet"], capsys)
    assert code == 0, err
    (longer,) = [d for d in run_dirs(tmp_path) if d != first]
    assert checkpoint_step(longer / "checkpoint.safetensors") == 25
    assert checkpoint_step(first / "checkpoint.safetensors") == 20


# -- data parallel ---------------------------------------------------------------------------
def torchrun(args: list[str], weights: Path | None = None) -> None:
    extra = ["--save-rank-weights", str(weights)] if weights is not None else []
    command = torchrun_command("tests.train_child", *extra, "--", *args, "--quiet")
    process = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()[-3000:]


def test_two_data_parallel_cpu_ranks_end_identical_and_only_rank_zero_writes(tmp_path):
    spec = moons_spec(tmp_path, steps=30)
    weights = tmp_path / "weights"
    weights.mkdir()
    torchrun(["run", str(spec)], weights)
    rank0 = load_file(weights / "rank0.safetensors")
    rank1 = load_file(weights / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    (run_dir,) = run_dirs(tmp_path)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.safetensors", "metrics.json", "run.json", "run.log", "samples.npz",
        "samples.png", "spec.yaml"]
    said = (run_dir / "run.log").read_text()
    assert "data parallel over 2 ranks" in said and "by DistributedDataParallel" in said
    saved = load_file(run_dir / "checkpoint.safetensors")
    assert "train.rng.noise.1" in saved
    assert checkpoint_step(run_dir / "checkpoint.safetensors") == 30
    for key in rank0:
        assert torch.equal(saved[f"network.{key}"], rank0[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moons.yaml", "runs", "weights"]


def test_a_classifier_trains_with_only_train_and_cannot_be_sampled(tmp_path, capsys):
    spec = moons_spec(tmp_path, steps=10).read_text()
    spec = (spec.replace("{kind: two_moons, n_train: 512, n_heldout: 128}",
                         "{kind: gaussian_mixture, components: 3, n_train: 512, n_heldout: 64}")
                .replace("{kind: mlp, width: 16, blocks: 1, dropout: 0.1}",
                         "{kind: classifier, num_classes: 3, channels: 8}")
                .replace("objective: {kind: dsm}", "objective: {kind: classification}"))
    path = tmp_path / "classifier.yaml"
    path.write_text(spec)
    code, _, err = run_cli(["run", str(path)], capsys)
    assert code == 2 and "--only train" in err and not run_dirs(tmp_path)
    code, _, err = run_cli(["run", str(path), "--only", "train", "--quiet"], capsys)
    assert code == 0, err
    (run_dir,) = run_dirs(tmp_path)
    assert (run_dir / "checkpoint.safetensors").is_file()
    assert math.isfinite(json.loads((run_dir / "metrics.json").read_text())["train_loss"])
    no_labels = spec.replace("{kind: gaussian_mixture, components: 3, n_train: 512, "
                             "n_heldout: 64}", "{kind: two_moons}")
    path.write_text(no_labels)
    code, _, err = run_cli(["run", str(path), "--only", "train"], capsys)
    assert code == 2 and "class labels" in err


def test_a_data_parallel_run_resumes_to_the_bits_of_an_uninterrupted_one(tmp_path):
    """Every rank's noise generator travels in rank 0's checkpoint: a 2-rank run trained to
    step 20 and resumed to 30 ends where a 30-step 2-rank run ends (constant learning rate, so
    that the schedule does not depend on the total)."""
    spec = moons_spec(tmp_path, steps=30)
    torchrun(["run", str(spec), "train.steps=20", "train.lr_schedule=constant"])
    (first,) = run_dirs(tmp_path)
    code = main(["run", str(spec), "train.lr_schedule=constant", "--resume", str(first)])
    assert code == 2, "one rank cannot continue a two-rank run"
    torchrun(["run", str(spec), "train.lr_schedule=constant", "--resume", str(first)])
    (longer,) = [d for d in run_dirs(tmp_path) if d != first]  # a finished run is not changed
    torchrun(["run", str(spec), "train.lr_schedule=constant"])
    (straight,) = [d for d in run_dirs(tmp_path) if d not in (first, longer)]
    resumed = training_tensors(longer / "checkpoint.safetensors")
    reference = training_tensors(straight / "checkpoint.safetensors")
    assert checkpoint_step(longer / "checkpoint.safetensors") == 30
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
