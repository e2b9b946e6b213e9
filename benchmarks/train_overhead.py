"""dkit's training step against a hand-written PyTorch loop: same network, data, optimizer, batch.

Both sides do the same work per step — draw a minibatch and noise levels, noise the batch, one
forward and backward pass, gradient clipping, an Adam step and an EMA update — and synchronise
with the host only at the end of each timed block. They run side by side in one process,
interleaved (dkit block, plain block, dkit block, ...) and repeated; the medians per step are
compared, so drifts in machine load hit both alike.

    python benchmarks/train_overhead.py --config tiny      # 2-D data, 3k-parameter MLP
    python benchmarks/train_overhead.py --config mlp       # 2-D data, 0.5M-parameter MLP
    python benchmarks/train_overhead.py --config unet      # 8x8 digits, the DDPM spec's U-Net

Results are recorded in docs/training.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from diffusers_kit import Adam, Diffusion
from diffusers_kit.data import Digits, TwoMoons
from diffusers_kit.networks import MLP, UNet
from diffusers_kit.objectives import SimpleLoss
from diffusers_kit.processes import DDPM
from diffusers_kit.train import EMA, TrainSettings


def setup(config: str) -> tuple[torch.Tensor, torch.nn.Module, int]:
    torch.manual_seed(0)
    if config == "tiny":  # a network so small that per-step Python overhead shows
        data = TwoMoons(n_train=8000, n_heldout=10).load().train
        return data, MLP(width=32, blocks=1, data_shape=(2,)), 128
    if config == "mlp":
        data = TwoMoons(n_train=8000, n_heldout=10).load().train
        network = MLP(width=256, blocks=3, data_shape=(2,))
        return data, network, 256
    data = Digits().load().train
    network = UNet(channels=16, channel_mult=[1, 2], res_blocks=2, attention_resolutions=[4],
                   dropout=0.0, data_shape=(1, 8, 8))
    return data, network, 64


class PlainLoop:
    """The loop one would write by hand for DDPM's L_simple (Ho et al. 2020, Algorithm 1)."""

    def __init__(self, network: torch.nn.Module, data: torch.Tensor, batch: int,
                 process: DDPM, seed: int) -> None:
        self.network, self.data, self.batch = network, data, batch
        self.steps = process.num_steps
        abar = process.alphas_cumprod.float()
        self.sqrt_abar, self.sqrt_one_minus = abar.sqrt(), (1 - abar).sqrt()
        self.optim = torch.optim.Adam(network.parameters(), lr=1e-3)
        self.params = list(network.parameters())
        self.shadow = [p.detach().clone() for p in self.params]
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(data), generator=self.generator)
        self.slot = 0

    def step(self) -> torch.Tensor:
        per_epoch = len(self.data) // self.batch
        if self.slot == per_epoch:
            self.order = torch.randperm(len(self.data), generator=self.generator)
            self.slot = 0
        x0 = self.data[self.order[self.slot * self.batch:(self.slot + 1) * self.batch]]
        self.slot += 1
        i = torch.randint(1, self.steps + 1, (x0.shape[0],), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x_t = (self.sqrt_abar[i - 1].reshape(shape) * x0
               + self.sqrt_one_minus[i - 1].reshape(shape) * noise)
        loss = (self.network(x_t, i.float() / self.steps) - noise).pow(2).mean()
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optim.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - 0.999)
        return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "mlp", "unet"), default="mlp")
    parser.add_argument("--block", type=int, default=50, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="blocks per side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data, network, batch = setup(args.config)
    process = DDPM(num_steps=1000)

    model = Diffusion(process, copy.deepcopy(network), SimpleLoss(), device="cpu")
    model.ema = EMA(model.network, 0.999)
    from diffusers_kit.train import Trainer

    settings = TrainSettings(steps=10**9, batch_size=batch, ema_decay=0.999, grad_clip=1.0,
                             log_every=10**9)
    trainer = Trainer(model.model, model.objective, data, Adam(lr=1e-3), settings, seed=0,
                      ema=model.ema)
    plain = PlainLoop(copy.deepcopy(network), data, batch, process, seed=0)

    def time_dkit() -> float:
        start = time.perf_counter()
        trainer.run(trainer.step + args.block)  # ends with the one host sync of a log point
        return (time.perf_counter() - start) / args.block

    def time_plain() -> float:
        start = time.perf_counter()
        total = torch.zeros(())
        for _ in range(args.block):
            total += plain.step()
        float(total)  # the same single host sync
        return (time.perf_counter() - start) / args.block

    time_dkit(), time_plain()  # warm-up: allocator, first-call costs
    dkit_times, plain_times = [], []
    for _ in range(args.repeats):
        dkit_times.append(time_dkit())
        plain_times.append(time_plain())
    d, p = statistics.median(dkit_times), statistics.median(plain_times)
    print(f"config={args.config} threads={torch.get_num_threads()} batch={batch} "
          f"params={sum(q.numel() for q in network.parameters()):,} block={args.block} "
          f"repeats={args.repeats}")
    print(f"dkit  median {d * 1e3:8.3f} ms/step")
    print(f"plain median {p * 1e3:8.3f} ms/step")
    print(f"ratio dkit / plain = {d / p:.3f}")


if __name__ == "__main__":
    main()
