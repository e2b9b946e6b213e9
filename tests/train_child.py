"""Run ``dkit`` in a child process for the kill / resume and data-parallel tests.

``python -m tests.train_child [--slow SECONDS] [--save-rank-weights DIR] [--note-rank DIR]
-- dkit-args...``

``--slow`` sleeps at every log point (host side only; the arithmetic is untouched) so the parent
can kill the child between two checkpoints. ``--save-rank-weights`` makes every rank write its
final network weights to DIR/rank<r>.safetensors after the run (outside the run folder), so the
test can compare the ranks. ``--note-rank`` makes every rank write DIR/rank<r> holding its own
process id and its parent's (the torchrun agent of its node) at start, so that a test can tell
which node hosts which ranks and kill one node's processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--save-rank-weights")
    parser.add_argument("--note-rank")
    parser.add_argument("dkit", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.note_rank:
        note = os.path.join(args.note_rank, f"rank{os.environ.get('RANK', '0')}")
        with open(note + ".tmp", "w") as handle:
            handle.write(f"{os.getpid()} {os.getppid()}")
        os.replace(note + ".tmp", note)
    from diffusers_kit import hookimpl
    from diffusers_kit.registry import get_plugin_manager

    class Slow:
        @hookimpl
        def dkit_train_step(self, run, step, loss):  # type: ignore[no-untyped-def]
            time.sleep(args.slow)

    if args.slow:
        get_plugin_manager().register(Slow())
    captured = {}
    if args.save_rank_weights:
        import diffusers_kit.cli.run as run_command  # where `dkit run` looks execute up

        original = run_command.execute

        def execute(*a, **k):  # type: ignore[no-untyped-def]
            run = original(*a, **k)
            captured["run"] = run
            return run

        run_command.execute = execute
    from diffusers_kit.cli.main import main as dkit

    argv = args.dkit[1:] if args.dkit[:1] == ["--"] else args.dkit
    code = dkit(argv)
    if args.save_rank_weights and "run" in captured:
        from safetensors.torch import save_file

        rank = int(os.environ.get("RANK", "0"))
        state = captured["run"].diffusion.network.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()},
                  os.path.join(args.save_rank_weights, f"rank{rank}.safetensors"))
    return code


if __name__ == "__main__":
    sys.exit(main())
