"""The per-sample Philox streams against torch.randn: cost of a standard-normal draw.

Shape (N, 1, 8, 8) (8x8 digits) at N = 64 and N = 20,000, one thread. Rows, side by side in
one process, timed in interleaved rounds (every row once per round; best round per row) by the
thread's CPU time (one torch thread: every row computes in this thread), so that other processes
on a shared machine do not count:

* ``torch.randn`` (torch's global generator) and ``torch.randn(generator=...)``;
* ``PerSampleNoise`` drawing a sequence of equal-shape draws, as a sampler's loop does
  (``--draws`` of them, so its look-ahead works), and drawing one draw alone (a fresh stream
  per draw: what the start noise costs);
* where the time goes: the Philox4x32-10 integer rounds and the Box-Muller transform of one
  draw, timed separately;
* the hash streams PerSampleNoise used before Philox (read from git at ``--old-commit``);
* with ``--compile``: the same Philox and Box-Muller functions fused by ``torch.compile``
  (needs a C++ compiler; the compile time is printed, and the numbers are checked equal to the
  eager ones), 16 draws a call at N = 64 and 2 at N = 20,000 (time per draw). The library does
  not compile: this row says what a fused kernel would give.

    python benchmarks/noise.py                 # the table in docs/noise.md
    python benchmarks/noise.py --compile       # plus the fused row (about a minute more)
"""

from __future__ import annotations

import argparse
import subprocess
import time
import types
from collections.abc import Callable

import torch

from diffusers_kit.solvers.noise import MASK32, PerSampleNoise, box_muller, fused_draw, philox4x32

SIZES = (64, 20000)


def old_generator(commit: str) -> type | None:
    """The hash-based PerSampleNoise as of ``commit`` (None where git cannot show it)."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:diffusers_kit/solvers/noise.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("old_noise")
    exec(compile(source, f"{commit}:noise.py", "exec"), module.__dict__)
    return module.PerSampleNoise


def cases(n: int, sequence: int, old: type | None, fused: Callable | None
          ) -> dict[str, Callable[[], float]]:
    """Each row's timer for draws of (n, 1, 8, 8): seconds per draw over ``sequence`` draws."""
    shape = (n, 1, 8, 8)
    generator = torch.Generator().manual_seed(0)
    counters = torch.arange(64), torch.arange(n // 4)[:, None]
    work = torch.empty((6, 1, n // 4, 64), dtype=torch.int64)
    words = philox4x32((*counters, 0, 0), (1, 0), work=work)
    floats = torch.empty((6, 1, n // 4, 64), dtype=torch.float64)
    out = torch.empty((1, n // 4, 4, 64))

    def timed(call: Callable[[int], object]) -> float:
        """Seconds per call of ``call(k)``, ``k = 0 .. sequence - 1``, made in a row."""
        start = time.thread_time()
        for k in range(sequence):
            call(k)
        return (time.thread_time() - start) / sequence

    def in_sequence(make: Callable) -> float:
        stream = make()
        return timed(lambda k: stream.randn(shape))

    rows: dict[str, Callable[[], float]] = {
        "torch.randn": lambda: timed(lambda k: torch.randn(shape)),
        "torch.randn(generator=)": lambda: timed(
            lambda k: torch.randn(shape, generator=generator)),
        "PerSampleNoise, draws in sequence": lambda: in_sequence(lambda: PerSampleNoise(1)),
        "PerSampleNoise, one draw alone": lambda: timed(
            lambda k: PerSampleNoise(1).randn(shape)),
        "  of which Philox rounds": lambda: timed(
            lambda k: philox4x32((*counters, k, 0), (1, 0), work=work)),
        "  of which Box-Muller": lambda: timed(lambda k: box_muller(words, floats, out)),
    }
    if old is not None:
        rows["hash streams (before), in sequence"] = lambda: in_sequence(lambda: old(1))
    if fused is not None:  # 16 draws a call at N = 64, as PerSampleNoise's look-ahead does
        count = 16 if n == SIZES[0] else 2
        key = torch.tensor(1), torch.tensor(0)
        start = time.perf_counter()
        z = fused(*counters, torch.arange(count)[:, None, None], *key)
        seconds = time.perf_counter() - start
        eager = PerSampleNoise(1)._compute(shape, 0, count, torch.device("cpu"))
        print(f"N = {n}: torch.compile took {seconds:.1f} s; equal to eager: "
              f"{torch.equal(z.reshape(eager.shape), eager)}")
        seed = 2**40 + 7  # another seed: the same compiled kernel, no recompilation
        start = time.perf_counter()
        z = fused(*counters, torch.arange(count)[:, None, None], torch.tensor(seed & MASK32),
                  torch.tensor(seed >> 32))
        seconds = time.perf_counter() - start
        eager = PerSampleNoise(seed)._compute(shape, 0, count, torch.device("cpu"))
        print(f"  seed {seed}: {seconds:.3f} s; equal to eager: "
              f"{torch.equal(z.reshape(eager.shape), eager)}")
        rows["Philox + Box-Muller fused (torch.compile), 16 or 2 draws a call"] = (
            lambda: timed(lambda k: fused(*counters, torch.arange(
                count * k, count * k + count)[:, None, None], *key)) / count)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--draws", type=int, default=100, help="draws in a sequence at N = 64 "
                        "(N = 20,000 takes a tenth, at least 3)")
    parser.add_argument("--old-commit", default="deaff36")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = old_generator(args.old_commit)
    fused = fused_draw() if args.compile else None
    times: dict[tuple[int, str], list[float]] = {}
    for n in SIZES:
        timers = cases(n, args.draws if n == SIZES[0] else max(3, args.draws // 10), old, fused)
        for _ in range(args.rounds):
            for name, timer in timers.items():
                times.setdefault((n, name), []).append(timer())
    baseline = {n: min(times[(n, "torch.randn")]) for n in SIZES}
    print(f"\ntorch {torch.__version__}, one thread, CPU time, best of {args.rounds} "
          "interleaved rounds\n")
    print("| draw of (N, 1, 8, 8) | N = 64 | x torch.randn | N = 20,000 | x torch.randn |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(name for _, name in times):
        cells = []
        for n in SIZES:
            best = min(times[(n, name)])
            value = f"{best * 1e6:.1f} us" if best < 1e-3 else f"{best * 1e3:.2f} ms"
            cells += [value, f"{best / baseline[n]:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
