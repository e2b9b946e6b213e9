"""Per-step cost of guidance on the CPU (one thread), for the digits U-Net of cfg_digits.yaml.

    OMP_NUM_THREADS=1 python benchmarks/guidance.py [--batch 64 256] [--repeats 20]

The class-conditional U-Net is built from the ``network`` section of specs/cfg_digits.yaml
through the registry (random weights: the cost does not depend on training), bound to the DDPM
process, in eval mode under ``no_grad``. Per batch size B it times, side by side in one process:

- (a) one plain conditional call ``model(x, t, y)`` at B;
- (b) one network call on the doubled batch 2B: the floor of classifier-free guidance, which
  evaluates ``[x; x]`` with labels ``[y; null]`` in a single call;
- (c) one guided step ``model.guided([ClassifierFree(3.0)], y).predict(x, t, "eps")`` at B; the
  goal is (c) / (b) <= 1.1, i.e. composing the terms costs at most 10 % over the doubled call;
- (d) one classifier-guidance step: the same U-Net without classes (``num_classes: null``)
  guided by a noise-aware classifier (the network of specs/classifier_digits.yaml) with
  ``ClassifierGuidance(scale=4.0)``, against one plain unconditional call (e) and the classifier's
  forward and input-gradient pass alone (f).

The cases are interleaved (a block of each, then again) after a warm-up, and the median time per
call over the blocks is reported, so drifts in machine load hit every case alike. Results are
recorded in docs/guidance.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from diffusers_kit import Diffusion
from diffusers_kit.guidance import ClassifierFree, ClassifierGuidance
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks import NoiseAwareClassifier
from diffusers_kit.pipeline import TrainedModel
from diffusers_kit.processes import DDPM
from diffusers_kit.registry import get_registry
from diffusers_kit.spec.loader import load_file

ROOT = Path(__file__).resolve().parents[1]
DATA_SHAPE = (1, 8, 8)


def build_networks() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """The conditional U-Net of cfg_digits.yaml, the same U-Net unconditional, and the
    noise-aware classifier of classifier_digits.yaml (random weights, eval mode)."""
    registry = get_registry()
    unet = dict(load_file(ROOT / "specs" / "cfg_digits.yaml").data["network"])
    classifier = dict(load_file(ROOT / "specs" / "classifier_digits.yaml").data["network"])
    torch.manual_seed(0)
    conditional = registry.build("network", unet, data_shape=DATA_SHAPE)
    unconditional = registry.build("network", {**unet, "num_classes": None, "class_dropout": 0.0},
                                   data_shape=DATA_SHAPE)
    noise_aware = registry.build("network", classifier, data_shape=DATA_SHAPE)
    assert isinstance(noise_aware, NoiseAwareClassifier)
    return conditional.eval(), unconditional.eval(), noise_aware.eval()


def cases(batch: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed calls at batch ``batch``, by row name (inputs built once, outside the timing)."""
    process = DDPM()
    conditional, unconditional, classifier_net = build_networks()
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *DATA_SHAPE, generator=g)
    t = torch.rand(batch, generator=g).clamp_min(1e-3)
    y = torch.randint(10, (batch,), generator=g)
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    y2 = torch.cat([y, torch.full_like(y, 10)])

    cond_model = ScoreModel(process, conditional).eval()
    cfg = cond_model.guided([ClassifierFree(3.0)], y)

    uncond_model = ScoreModel(process, unconditional).eval()
    wrapped = TrainedModel.from_diffusion(Diffusion(DDPM(), classifier_net, device="cpu"))
    term = ClassifierGuidance(wrapped, scale=4.0)
    if (reason := term.check(uncond_model)) is not None:
        raise SystemExit(f"classifier guidance needs {reason}")
    cg = uncond_model.guided([term], y)
    grad_net = copy.deepcopy(classifier_net)  # same weights, its own autograd state

    def classifier_gradient() -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = grad_net(xg, t).float()
            chosen = torch.log_softmax(logits, -1).gather(1, y.reshape(-1, 1)).sum()
            (grad,) = torch.autograd.grad(chosen, xg)
        return grad

    return {
        "a": lambda: cond_model(x, t, y),
        "b": lambda: cond_model(x2, t2, y2),
        "c": lambda: cfg.predict(x, t, "eps"),
        "e": lambda: uncond_model(x, t),
        "d": lambda: cg.predict(x, t, "eps"),
        "f": classifier_gradient,
    }


LABELS = {
    "a": "(a) conditional call, batch B",
    "b": "(b) one call on the doubled batch 2B",
    "c": "(c) classifier-free guided step (w = 3)",
    "e": "(e) unconditional call, batch B",
    "d": "(d) classifier-guided step (s = 4)",
    "f": "(f) classifier forward + input gradient",
}


def measure(batch: int, repeats: int, budget: float) -> dict[str, float]:
    """Median seconds per call of every case at ``batch``, interleaved."""
    calls = cases(batch)
    with torch.no_grad():
        for fn in calls.values():  # warm-up: allocator, first-call costs
            for _ in range(3):
                fn()
        # calls per block: about budget / (cases * repeats) seconds per block
        started = time.perf_counter()
        calls["b"]()
        per_call = time.perf_counter() - started
        block = max(1, int(budget / (len(calls) * repeats * per_call)))
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():
                started = time.perf_counter()
                for _ in range(block):
                    fn()
                times[name].append((time.perf_counter() - started) / block)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=20, help="timed blocks per case")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="rough time budget per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {batch: measure(batch, args.repeats, args.seconds) for batch in args.batch}

    console = Console()
    table = Table(title=f"guidance cost per step (CPU, {torch.get_num_threads()} thread(s), "
                        f"median of {args.repeats} blocks)")
    table.add_column("case")
    for batch in args.batch:
        table.add_column(f"B = {batch}", justify="right")
    for name in ("a", "b", "c", "e", "d", "f"):
        table.add_row(LABELS[name], *(f"{results[b][name] * 1e3:.2f} ms" for b in args.batch))
    ratios = [("(c) / (b): CFG over its doubled-call floor (goal <= 1.1)", "c", "b"),
              ("(c) / (a): CFG over a plain conditional call", "c", "a"),
              ("(d) / (e): classifier guidance over a plain unconditional call", "d", "e"),
              ("(d) / ((e) + (f)): over its parts", "d", "ef")]

    def ratio(b: int, num: str, den: str) -> float:
        return results[b][num] / sum(results[b][k] for k in den)

    for text, num, den in ratios:
        table.add_row(text, *(f"{ratio(b, num, den):.3f}" for b in args.batch),
                      style="bold")
    console.print(table)

    print()
    print("| case | " + " | ".join(f"B = {b}" for b in args.batch) + " |")
    print("|---|" + "---:|" * len(args.batch))
    for name in ("a", "b", "c", "e", "d", "f"):
        print(f"| {LABELS[name]} | "
              + " | ".join(f"{results[b][name] * 1e3:.2f} ms" for b in args.batch) + " |")
    for text, num, den in ratios:
        print(f"| {text} | " + " | ".join(f"**{ratio(b, num, den):.3f}**" for b in args.batch)
              + " |")


if __name__ == "__main__":
    main()
