"""Data-parallel training: ``DistributedDataParallel`` against the hand-written all-reduce.

Two ranks on gloo (CPU, one thread each) train the DDPM spec's digits U-Net by L_simple, once
per route, side by side in one process tree: the same initial weights, data, batch and
optimizer, blocks of ``--steps`` steps interleaved (DDP block, all-reduce block, DDP block,
...) and repeated ``--rounds`` times; the median block gives the steps per second, so drifts
in machine load hit both routes alike. The all-reduce route averages the gradients in one
all-reduce after backward; DDP all-reduces buckets of gradients while backward still runs. The
time of one all-reduce of all gradients alone (median of 7) is what overlapping can hide.

    python benchmarks/ddp.py                       # the DDPM spec's U-Net (16 channels)
    python benchmarks/ddp.py --channels 64         # 16 x the parameters: more to communicate

Started plainly, it launches itself under ``torchrun --nproc_per_node 2``; rank 0 prints the
table. Results are recorded in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusers_kit import Adam
from diffusers_kit.data import Digits
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks import UNet
from diffusers_kit.objectives import SimpleLoss
from diffusers_kit.processes import DDPM
from diffusers_kit.train import Trainer, TrainSettings, distributed_from_env, leave_distributed

ROUTES = ("ddp", "all_reduce")


def launch(argv: list[str]) -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                            "2", "--master_addr", "127.0.0.1", "--master_port", port,
                            __file__, *argv], env=env)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = distributed_from_env("cpu")
    data = Digits().load().train
    torch.manual_seed(0)
    network = UNet(channels=args.channels, channel_mult=[1, 2], res_blocks=2,
                   attention_resolutions=[4], dropout=0.0, data_shape=(1, 8, 8))
    settings = TrainSettings(steps=10**9, batch_size=args.batch, log_every=args.steps,
                             grad_clip=1.0)
    trainers = {route: Trainer(ScoreModel(DDPM(), copy.deepcopy(network)), SimpleLoss(), data,
                               Adam(lr=1e-3), settings, seed=0, dist=rank,
                               data_parallel=route)
                for route in ROUTES}
    assert trainers["ddp"].ddp is not None and trainers["all_reduce"].ddp is None
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for route, trainer in trainers.items():
            dist.barrier()
            started = time.perf_counter()
            trainer.run(trainer.step + args.steps)
            dist.barrier()
            if round_:
                times[route].append(time.perf_counter() - started)
    count = sum(p.numel() for p in network.parameters())
    flat, reduce_times = torch.zeros(count), []
    for _ in range(7):  # what there is to overlap: one all-reduce of all gradients alone
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(flat)
        reduce_times.append(time.perf_counter() - started)
    if rank.main:
        print(f"U-Net channels {args.channels}: {count:,} parameters, {count * 4 / 2**20:.2f} "
              f"MiB of gradients; 2 ranks (gloo, CPU, 1 thread each), batch {args.batch} per "
              f"rank, median of {args.rounds} blocks of {args.steps} steps")
        print(f"{'route':<12} {'steps/s':>8} {'ms/step':>8}")
        medians = {route: statistics.median(values) / args.steps
                   for route, values in times.items()}
        for route, seconds in medians.items():
            print(f"{route:<12} {1 / seconds:8.2f} {1000 * seconds:8.1f}")
        print(f"DDP / all-reduce speed: {medians['all_reduce'] / medians['ddp']:.3f}")
        print(f"one all-reduce of all gradients alone: "
              f"{1000 * statistics.median(reduce_times):.1f} ms")
    leave_distributed(rank)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64, help="examples per rank and step")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per route")
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return launch(sys.argv[1:])
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
