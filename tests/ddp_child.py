"""One rank of the data-parallel routes test (``tests/test_ddp.py``), run under torchrun.

``python -m torch.distributed.run --nproc_per_node 2 -m tests.ddp_child OUT``

Trains the same small score network on two moons three times in one process group: denoising
score matching through ``DistributedDataParallel`` and through the hand-written all-reduce, and
implicit score matching with the route left to the trainer; then the first two again with a
network holding a parameter its forward never uses (DDP must be told to look for it). Every rank
writes ``OUT/<name>-rank<r>.safetensors`` (its final network weights) and
``OUT/<name>-rank<r>.json`` (whether the trainer used DDP), and ``OUT/refused-rank<r>.txt``:
the error asking for DDP with an objective that differentiates twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusers_kit import VE, Adam
from diffusers_kit.data import TwoMoons
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks import MLP
from diffusers_kit.objectives import DenoisingScoreMatching, ImplicitScoreMatching
from diffusers_kit.objectives.base import Objective
from diffusers_kit.train import Trainer, TrainSettings, distributed_from_env, leave_distributed

STEPS = 12


class Spare(MLP):
    """An MLP with a parameter that no forward uses."""

    def __init__(self, **options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**options)
        self.spare = torch.nn.Parameter(torch.ones(3))


def trainer(objective: Objective, route: str, data: torch.Tensor, dist,  # type: ignore[no-untyped-def]
            spare: bool = False) -> Trainer:
    torch.manual_seed(0)
    network = (Spare if spare else MLP)(width=32, blocks=2, data_shape=(2,))
    model = ScoreModel(VE(sigma_min=0.05, sigma_max=4.0, num_levels=5), network)
    settings = TrainSettings(steps=STEPS, batch_size=16, grad_accumulation=2, log_every=4,
                             lr_schedule="cosine", warmup_steps=3)
    return Trainer(model, objective, data, Adam(lr=0.01), settings, seed=5, dist=dist,
                   data_parallel=route)


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist = distributed_from_env("cpu")
    data = TwoMoons(n_train=512, n_heldout=8).load().train
    runs = (("dsm-ddp", DenoisingScoreMatching(), "ddp"),
            ("dsm-all_reduce", DenoisingScoreMatching(), "all_reduce"),
            ("ism-auto", ImplicitScoreMatching(trace="exact"), "auto"),
            ("spare-ddp", DenoisingScoreMatching(), "ddp"),
            ("spare-all_reduce", DenoisingScoreMatching(), "all_reduce"))
    for name, objective, route in runs:
        job = trainer(objective, route, data, dist, spare=name.startswith("spare"))
        job.run(STEPS)
        state = job.model.network.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(out / f"{name}-rank{dist.rank}.safetensors"))
        (out / f"{name}-rank{dist.rank}.json").write_text(json.dumps(
            {"ddp": job.ddp is not None, "losses": job.log.losses}))
    try:
        trainer(ImplicitScoreMatching(), "ddp", data, dist)
    except ValueError as exc:
        (out / f"refused-rank{dist.rank}.txt").write_text(str(exc))
    leave_distributed(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
