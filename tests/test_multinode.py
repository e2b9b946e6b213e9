"""Multi-node training through torchrun's c10d rendezvous: two "nodes" of two CPU processes each
on this machine (gloo), each node one ``python -m torch.distributed.run`` in its own process.

What the math says must hold, and is checked:

- **Two nodes x two ranks = one process with the global batch.** Every rank takes its quarter of
  each global batch (all ranks draw the same data permutation) and the gradients are averaged,
  so the averaged gradient is the gradient of the mean loss over the global batch. That makes
  the parameters equal to a one-process run with ``batch_size`` four times as large when the
  loss of an example depends on nothing but the example: here a classifier trained by
  cross-entropy at process time 0 of a VP process (``alpha(0) = 1``, ``sigma(0) = 0``: the
  noise the objective draws is multiplied by 0, so each rank's own noise generator does not
  matter), without dropout, inside the first epoch (in one process the data order and the
  noise share a generator, so the second epoch's permutation would differ). The two runs add
  the same numbers in another order (four partial means averaged, against one mean), so they
  agree to float rounding, not bit for bit: ``TOLERANCE`` below.
- **Resume after one node is killed** continues to the bits of an uninterrupted two-node run:
  the checkpoint holds every rank's noise generator, and the same four ranks add the same
  numbers in the same order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_kit.cli.main import main
from diffusers_kit.pipeline import run_folders
from tests.helpers import ROOT, child_env, free_port, torchrun

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="finds a node's worker processes through /proc"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py

# 4 ranks x 8 = a global batch of 32; 512 examples are 16 global batches, so 12 steps stay in
# the first epoch
SPEC = """\
name: clf
seed: 3
device: cpu
data: {{kind: gaussian_mixture, components: 3, n_train: 512, n_heldout: 64}}
process: {{kind: vp}}
network: {{kind: classifier, num_classes: 3, channels: 8, dropout: 0.0}}
objective: {{kind: classification, time: 0}}
train:
  steps: 12
  batch_size: 8
  log_every: 2
  checkpoint_every: 4
  optimizer: {{kind: adam, lr: 0.01}}
output: {{root: {root}}}
"""
# Rounding: the gradients differ in their last bits (summation order), Adam divides by
# sqrt(v) ~ |g| so the steps differ relatively as much (~1e-6 at most), and 12 steps of at most
# lr = 0.01 move a parameter by at most 0.12: a difference of ~1e-7 (measured: 6e-8). A run
# with another global batch differs by more than 1e-3 (checked below), so 1e-5 separates the
# two by two orders of magnitude either way.
TOLERANCE = 1e-5


def children(pid: int) -> list[int]:
    """Every process whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants, each with its process group: torchrun starts every
    worker in a session of its own, so killing the agent's group alone would leave them."""
    stack, seen = [pid], []
    while stack:
        current = stack.pop()
        seen.append(current)
        stack.extend(children(current))
    for victim in reversed(seen):
        for kill in (os.killpg, os.kill):
            with suppress(ProcessLookupError, PermissionError):
                kill(victim, signal.SIGKILL)


class Nodes:
    """Two torchrun agents joined by a c10d rendezvous on 127.0.0.1 (node ``a`` hosts the
    rendezvous store); logs in ``logs``; everything they started is killed on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.agents: dict[str, subprocess.Popen] = {}

    def start(self, args: list[str]) -> None:
        port, rdzv = free_port(), uuid.uuid4().hex[:8]
        env = child_env()
        self.logs.mkdir(parents=True, exist_ok=True)
        for node, host in (("a", 1), ("b", 0)):
            log = open(self.logs / f"{node}.log", "wb")  # noqa: SIM115 (closed with the process)
            self.agents[node] = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                 "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", rdzv,
                 "--rdzv_conf", f"is_host={host}", "--max_restarts", "0",
                 "-m", "tests.train_child", *args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            log.close()

    def wait(self, node: str, timeout: float) -> int:
        return self.agents[node].wait(timeout=timeout)

    def log(self, node: str) -> str:
        return (self.logs / f"{node}.log").read_text(errors="replace")[-4000:]

    def finish(self, timeout: float = 240) -> None:
        for node in self.agents:
            assert self.wait(node, timeout) == 0, f"node {node}:\n{self.log(node)}"

    def kill_all(self) -> None:
        for agent in self.agents.values():
            kill_tree(agent.pid)
            agent.wait(timeout=30)


@contextmanager
def nodes(logs: Path):  # type: ignore[no-untyped-def]
    pair = Nodes(logs)
    try:
        yield pair
    finally:
        pair.kill_all()


def train_dkit(spec: Path, *extra: str) -> list[str]:
    return ["--", "run", str(spec), "--only", "train", "--quiet", *extra]


def step_of(checkpoint: Path) -> int:
    with safe_open(str(checkpoint), framework="pt") as handle:
        return json.loads(handle.metadata()["training"])["train_step"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run_dir / "checkpoint.safetensors").items()
            if k.startswith(("network.", "ema."))}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 4
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_nodes_train_as_one_process_and_resume_after_a_node_is_killed(tmp_path):
    root = tmp_path / "runs"
    spec = tmp_path / "clf.yaml"
    spec.write_text(SPEC.format(root=root), encoding="utf-8")

    def new_run(before: set[Path]) -> Path:
        (found,) = set(run_folders(root, "clf")) - before
        return found

    # one process, the same global batch of 32 (and, for contrast, another global batch)
    assert main(["run", str(spec), "--only", "train", "--quiet", "train.batch_size=32"]) == 0
    (single,) = run_folders(root, "clf")
    assert main(["run", str(spec), "--only", "train", "--quiet", "train.batch_size=16"]) == 0
    other_batch = new_run({single})

    with nodes(tmp_path / "logs-straight") as pair:
        pair.start(train_dkit(spec))
        pair.finish()
    straight = new_run({single, other_batch})
    assert step_of(straight / "checkpoint.safetensors") == 12
    said = (straight / "run.log").read_text()
    assert "data parallel over 4 ranks" in said and "by DistributedDataParallel" in said
    assert largest_difference(weights(straight), weights(single)) < TOLERANCE
    assert largest_difference(weights(straight), weights(other_batch)) > 1e-3

    # kill the node that does not hold rank 0 after the first checkpoint: rank 0's node fails
    # (its peers are gone) and says so, the checkpoint stays
    notes = tmp_path / "notes"
    notes.mkdir()
    with nodes(tmp_path / "logs-killed") as pair:
        pair.start(["--slow", "0.4", "--note-rank", str(notes), *train_dkit(spec)])
        deadline = time.monotonic() + 120
        killed = None
        while killed is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            for node in pair.agents:
                assert pair.agents[node].poll() is None, f"node {node}:\n{pair.log(node)}"
            found = set(run_folders(root, "clf")) - {single, other_batch, straight}
            if found and (next(iter(found)) / "checkpoint.safetensors").is_file() and len(
                    list(notes.iterdir())) == 4:
                (killed,) = found
            time.sleep(0.05)
        agent_of_rank0 = int((notes / "rank0").read_text().split()[1])
        (victim,) = [n for n, agent in pair.agents.items() if agent.pid != agent_of_rank0]
        (survivor,) = set(pair.agents) - {victim}
        kill_tree(pair.agents[victim].pid)
        for note in notes.iterdir():  # the victim's workers, in their own sessions
            pid, parent = map(int, note.read_text().split())
            if parent == pair.agents[victim].pid:
                kill_tree(pid)
        code = pair.wait(survivor, timeout=90)
        assert code != 0, pair.log(survivor)
        said = " ".join(pair.log(survivor).split())
    step = step_of(killed / "checkpoint.safetensors")
    assert 0 < step < 12
    assert "another rank of the data-parallel job is gone" in said, said
    assert f"--resume {killed}" in said and "internal error" not in said, said
    record = json.loads((killed / "run.json").read_text())
    assert record["status"] == "failed", record

    with nodes(tmp_path / "logs-resumed") as pair:
        pair.start(train_dkit(spec, "--resume", str(killed)))
        pair.finish()
    assert f"resuming from step {step}" in (killed / "run.log").read_text()
    assert step_of(killed / "checkpoint.safetensors") == 12
    resumed, reference = weights(killed), weights(straight)
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
    assert json.loads((killed / "run.json").read_text())["status"] == "finished"


# -- a referenced model, built once by rank 0 --------------------------------------------------
TEACHER = """\
name: teacher
seed: 1
device: cpu
data: {kind: gaussian_mixture, components: 3, n_train: 256, n_heldout: 32}
process: {kind: ve, sigma_min: 0.002, sigma_max: 80.0}
network: {kind: mlp, width: 16, blocks: 1}
objective: {kind: dsm}
train: {steps: 8, batch_size: 16, log_every: 4}
"""
STUDENT = """\
name: student
seed: 2
device: cpu
data: {{kind: gaussian_mixture, components: 3, n_train: 256, n_heldout: 32}}
process: {{kind: ve, sigma_min: 0.002, sigma_max: 80.0}}
network:
  kind: consistency_precond
  sigma_data: 0.5
  network: {{kind: mlp, width: 16, blocks: 1}}
objective: {{kind: consistency_distillation, teacher: teacher.yaml, points: 6, solver: euler,
            init: none}}
train: {{steps: 6, batch_size: 16, log_every: 3}}
output: {{root: {root}}}
"""


def test_under_torchrun_rank_zero_builds_a_referenced_model_once_for_every_rank(tmp_path):
    """The student's teacher (a spec reference) does not exist yet: rank 0 trains it alone in
    its own run folder while rank 1 waits, then both load it and distil from it. Before, every
    rank built it itself: rank 0 trained it as a data-parallel job of its own, waiting for rank
    1, which waited for rank 0's build lock."""
    root = tmp_path / "runs"
    (tmp_path / "teacher.yaml").write_text(TEACHER, encoding="utf-8")
    spec = tmp_path / "student.yaml"
    spec.write_text(STUDENT.format(root=root), encoding="utf-8")
    weights = tmp_path / "weights"
    weights.mkdir()
    process = subprocess.Popen(
        torchrun("tests.train_child", "--save-rank-weights", str(weights), *train_dkit(spec)),
        cwd=ROOT, env=child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=240)
    finally:
        kill_tree(process.pid)
    assert process.returncode == 0, out.decode()[-3000:]
    (teacher,) = run_folders(root, "teacher")  # built once
    (student,) = run_folders(root, "student")
    assert json.loads((teacher / "run.json").read_text())["status"] == "finished"
    (dependency,) = json.loads((student / "run.json").read_text())["dependencies"]
    assert dependency["field"] == "objective.teacher" and dependency["run"] == str(teacher)
    assert dependency["reused"] is False  # rank 0 built it
    said = (student / "run.log").read_text()
    assert "data parallel over 2 ranks" in said and "step 6 loss" in said
    rank0, rank1 = (load_file(weights / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
