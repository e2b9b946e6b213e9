"""The two data-parallel routes of the trainer (``diffusers_kit.train``): objectives that declare
``ddp_ready`` train through ``DistributedDataParallel``, the others (implicit score matching
differentiates twice) through the hand-written all-reduce, and both give the same parameters.

Both routes average the same per-rank gradients: DDP divides each bucket by the world size and
sums over the ranks, the hand-written route sums the flat gradient and then divides. With two
ranks the sum of two numbers does not depend on the order and the division by 2 is exact, so
the gradients agree bit for bit and so do the parameters; a different bucketing or ring order
could only change the last bits of a sum, so the test allows float rounding (1e-6 after 12
Adam steps of lr 0.01, whose steps differ relatively by at most ~1e-6 of lr) and reports
equality separately.
"""

from __future__ import annotations

import json
import subprocess

import torch
from safetensors.torch import load_file

from diffusers_kit.model import ScoreModel
from diffusers_kit.networks import MLP
from diffusers_kit.objectives import (
    DenoisingScoreMatching,
    FlowMatching,
    ImplicitScoreMatching,
    NoisyClassification,
    Reconstruction,
    SimpleLoss,
    SlicedScoreMatching,
)
from diffusers_kit.objectives.base import Objective
from diffusers_kit.processes import VE
from tests.helpers import ROOT, child_env, torchrun


def test_ddp_is_declared_by_first_order_objectives_and_off_by_default():
    assert Objective.ddp_ready is False  # a third-party objective that does not say
    for kind in (DenoisingScoreMatching, FlowMatching, SimpleLoss, NoisyClassification):
        assert kind.ddp_ready and not kind.differentiates_twice, kind
    for kind in (ImplicitScoreMatching, SlicedScoreMatching, Reconstruction):
        assert not kind.ddp_ready, kind


def test_a_view_through_a_wrapper_calls_the_wrapper_and_keeps_the_network():
    network = MLP(width=8, blocks=1, data_shape=(2,))
    model = ScoreModel(VE(), network)
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):  # type: ignore[no-untyped-def]
            calls.append(len(args))
            return self.inner(*args)

    view = model.through(Wrapper(network))
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    assert torch.equal(view.score(x, t), model.score(x, t)) and calls == [2]
    assert view.network is network
    assert view.state_dict().keys() == model.state_dict().keys()


def test_ddp_and_the_hand_written_all_reduce_give_the_same_parameters(tmp_path):
    process = subprocess.run(torchrun("tests.ddp_child", str(tmp_path)), cwd=ROOT,
                             env=child_env(), capture_output=True, timeout=300)
    assert process.returncode == 0, process.stderr.decode()[-3000:]

    def read(name: str, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
        return (load_file(tmp_path / f"{name}-rank{rank}.safetensors"),
                json.loads((tmp_path / f"{name}-rank{rank}.json").read_text()))

    for name in ("dsm-ddp", "dsm-all_reduce", "ism-auto", "spare-ddp", "spare-all_reduce"):
        zero, one = read(name, 0)[0], read(name, 1)[0]  # the ranks stay identical
        assert all(torch.equal(zero[k], one[k]) for k in zero), name
    start = MLP(width=32, blocks=2, data_shape=(2,))
    for prefix in ("dsm", "spare"):
        ddp, ddp_info = read(f"{prefix}-ddp", 0)
        hand, hand_info = read(f"{prefix}-all_reduce", 0)
        assert ddp_info["ddp"] and not hand_info["ddp"]
        moved = max(float((hand[k] - v).abs().max()) for k, v in start.state_dict().items())
        assert moved > 1e-2  # the parameters did train
        difference = max(float((ddp[k] - hand[k]).abs().max()) for k in hand)
        assert difference < 1e-6, (prefix, difference)
    assert torch.equal(read("spare-ddp", 0)[0]["spare"], torch.ones(3))  # unused: not moved
    assert not read("ism-auto", 0)[1]["ddp"]  # differentiates twice: the all-reduce route
    refused = (tmp_path / "refused-rank0.txt").read_text()
    assert "ImplicitScoreMatching does not declare ddp_ready" in refused
