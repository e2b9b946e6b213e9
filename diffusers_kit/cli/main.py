"""``dkit``: argument parsing, error reporting (exit status 2 for user mistakes), dispatch.

Each subcommand is a module ``diffusers_kit.cli.<name>`` with ``register(subparsers)`` that adds
its parser and sets ``func`` (``args -> exit status``).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape

from diffusers_kit import threads as thread_policy
from diffusers_kit.checkpoint import CheckpointError
from diffusers_kit.console import make_console
from diffusers_kit.devices import is_out_of_memory
from diffusers_kit.registry import HOOK_FAILURES
from diffusers_kit.run.stages import NonFiniteResult
from diffusers_kit.spec.errors import SpecError
from diffusers_kit.version import __version__

COMMANDS = ("run", "validate", "schema", "plugins", "process", "sample", "likelihood", "runs",
            "evaluate", "sweep", "restore", "merge", "new_plugin", "import_pipeline", "export",
            "tune_times")

# exit statuses (docs/errors.md): 1 training stopped (NaN) or NaN samples / metrics, 2 a
# mistake in a spec or on the command line, 3 the environment (file system, memory, a plugin
# that cannot load), 4 a corrupt or foreign file (checkpoint, run folder), 5 the run finished
# but a plugin's hook failed, 70 a bug in dkit (re-run with --debug for the traceback),
# 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, handled like Ctrl-C)
TRAINING_STOPPED = 1
USER_ERROR = 2
ENVIRONMENT_ERROR = 3
CORRUPT_FILE = 4
PLUGIN_HOOK_FAILED = 5
INTERNAL_ERROR = 70
INTERRUPTED = 130
TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class _Termination:
    """SIGTERM handled like Ctrl-C: the handler SIGINT has now is called (during training the
    trainer's, which stops after the current step and writes a checkpoint; elsewhere Python's,
    which raises KeyboardInterrupt), so the same clean-up runs: the record says
    ``interrupted``, a half-written output folder is removed. ``received`` turns the exit
    status 130 into 143."""

    def __init__(self) -> None:
        self.received = False

    def handle(self, signum: int, frame: Any) -> None:
        self.received = True
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored (a background job of a shell): a SIGTERM still stops
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        self.received = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self.handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


TERMINATION = _Termination()


#: the commands that run a network (where the number of CPU threads matters)
COMPUTING = ("run", "sample", "likelihood", "evaluate", "sweep", "restore")


def thread_note(requested: str, threads: int, *, environ: dict[str, str] | None = None,
                cores: int | None = None, load: float | None = None) -> str | None:
    """What to tell the user when the automatic thread choice (:mod:`diffusers_kit.threads`)
    used fewer threads than there are cores because other processes keep some busy; None when
    the machine was free or the user chose (``--threads N``, ``OMP_NUM_THREADS``)."""

    environ = dict(os.environ) if environ is None else environ
    if requested not in (None, "auto") or environ.get("OMP_NUM_THREADS", "").strip():
        return None
    cores = thread_policy.usable_cores() if cores is None else cores
    if threads >= cores:
        return None
    load = thread_policy.busy_cores() if load is None else load
    return (f"note: other processes keep {load:.1f} of this machine's {cores} cores busy, so "
            f"torch uses {threads} thread{'s' if threads != 1 else ''} (more threads than free "
            "cores would slow it down; choose with --threads N or OMP_NUM_THREADS=N)")


def seed_option(text: str) -> int:
    """``--seed`` of every command, checked as the spec's ``seed`` is (an integer from 0 to
    2^63 - 1: the noise keys use all 64 bits, so no two seeds in range share a stream)."""
    from diffusers_kit.spec.models import Spec

    bounds = Spec.model_fields["seed"].metadata  # the spec's bounds: one place
    low = next(m.ge for m in bounds if getattr(m, "ge", None) is not None)
    high = next(m.le for m in bounds if getattr(m, "le", None) is not None)
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"a seed: an integer from {low} to {high} (2**63 - 1), "
                                         f"as the spec's seed; given {text}")
    return value


class UsageError(Exception):
    """A mistake on the command line (not in a spec)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors also exit 2, without noise
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dkit", description="Declarative diffusion and score-based models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--threads", default="auto", metavar="N|auto",
                        help="CPU threads for torch (default auto: the free cores; see "
                             "diffusers_kit.threads)")
    parser.add_argument("--trust-unverified", action="store_true",
                        help="load checkpoints that carry no checksum (files older than dkit "
                             "0.2; every newer one has a checksum, verified on load)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (also after the command, or "
                             "DKIT_DEBUG=1), for bug reports")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"diffusers_kit.cli.{name}").register(subparsers)
    return parser


def print_spec_error(error: SpecError, console: Console) -> None:
    source = f" in {error.source}" if error.source else ""
    console.print(f"[bold red]error:[/] {len(error.issues)} problem(s){escape(source)}")
    for issue in error.issues:
        where = f"[cyan]{escape(issue.where)}[/] " if issue.where else ""
        text = (f"  {where}[bold]{escape(issue.field)}[/]: expected {escape(issue.expected)}; "
                f"given {escape(issue.given_text)}")
        if issue.suggestions:
            text += f" [green](did you mean {escape(' or '.join(map(repr, issue.suggestions)))}?)"
        console.print(text, soft_wrap=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: the commands that read a finished run and write into its folder (not under output.root)
RUN_READERS = ("sample", "restore", "evaluate", "sweep", "likelihood")


def _environment_message(exc: BaseException, command: str | None = None) -> str:
    """The message of an environment failure, with advice that fits ``command``: only
    ``dkit run`` writes checkpoints and chooses its folder by ``output.root``; the commands that
    read a finished run write into that run's folder."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        reason = exc.strerror or _first_line(exc)
        hint = ""
        trains = command not in RUN_READERS
        if exc.errno == errno.ENOSPC:
            hint = ("; free some space: the last checkpoint written is intact" if trains else
                    "; free some space: this command's partial output was removed")
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = ("; choose a writable output.root" if trains else
                    "; this command writes into the run folder it was given: make that folder "
                    "writable, or copy the run somewhere writable")
        return f"{reason}{escape(where)}{hint}"
    if is_out_of_memory(exc):
        return "out of memory: lower sample.n, sample.batch_size or train.batch_size"
    return escape(_first_line(exc))


def main(argv: list[str] | None = None) -> int:
    before = os.environ.get("DKIT_TRUST_UNVERIFIED")
    try:
        with TERMINATION.installed():
            code = _main(argv)
    finally:  # --trust-unverified holds for this command only (main may run in-process)
        if before is None:
            os.environ.pop("DKIT_TRUST_UNVERIFIED", None)
        else:
            os.environ["DKIT_TRUST_UNVERIFIED"] = before
    if code == INTERRUPTED and TERMINATION.received:
        return TERMINATED
    return code


def _main(argv: list[str] | None = None) -> int:
    err = make_console(stderr=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line (dkit run s.yaml --debug) and shows tracebacks
    debug = "--debug" in argv or os.environ.get("DKIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]

    failures_before = len(HOOK_FAILURES)
    command = None
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        command = args.command
        if extra:  # overrides may also follow options: dkit run s.yaml --quiet a.b=1
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                  for e in extra):
                args.overrides = [*args.overrides, *extra]
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.version:
            print(f"dkit {__version__}")
            return 0
        if args.trust_unverified:  # read by checkpoint.load_checkpoint, for this command
            os.environ["DKIT_TRUST_UNVERIFIED"] = "1"
        if not getattr(args, "func", None):
            parser.print_help()
            return USER_ERROR
        try:
            threads = thread_policy.apply_thread_policy(args.threads)
        except ValueError as exc:
            parser.error(str(exc))
        note = thread_note(args.threads, threads)
        if note and args.command in COMPUTING and not getattr(args, "quiet", False):
            err.print(note, soft_wrap=True, markup=False, highlight=False)
        code = int(args.func(args) or 0)
        failures = HOOK_FAILURES[failures_before:]
        if failures and code == 0:
            for failure in failures:
                err.print(f"[bold red]error:[/] plugin {escape(failure.plugin)!r} failed in "
                          f"{failure.hook}: {escape(failure.error)}", soft_wrap=True)
            err.print("the command finished without those hooks; exit status "
                      f"{PLUGIN_HOOK_FAILED}")
            return PLUGIN_HOOK_FAILED
        return code
    except SpecError as exc:
        _debug_trace(err, debug)
        print_spec_error(exc, err)
        return USER_ERROR
    except NonFiniteResult as exc:
        _debug_trace(err, debug)
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return TRAINING_STOPPED
    except UsageError as exc:
        _debug_trace(err, debug)
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        return USER_ERROR
    except CheckpointError as exc:
        _debug_trace(err, debug)
        err.print(f"[bold red]error:[/] checkpoint {escape(exc.path)} cannot be used: "
                  f"{escape(exc.problem)}", soft_wrap=True)
        return CORRUPT_FILE
    except KeyboardInterrupt:
        _debug_trace(err, debug)
        err.print("[yellow]terminated (SIGTERM)[/]" if TERMINATION.received
                  else "[yellow]interrupted[/]")
        return INTERRUPTED
    except (OSError, MemoryError) as exc:
        _debug_trace(err, debug)
        err.print(f"[bold red]error:[/] {_environment_message(exc, command)}",
                  soft_wrap=True)
        return ENVIRONMENT_ERROR
    except Exception as exc:
        if is_out_of_memory(exc):
            _debug_trace(err, debug)
            err.print(f"[bold red]error:[/] {_environment_message(exc, command)}",
                  soft_wrap=True)
            return ENVIRONMENT_ERROR
        if debug:
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: "
                  f"{escape(_first_line(exc))}\nThis is a bug in dkit or a plugin: please re-run "
                  "with --debug and report the traceback.", soft_wrap=True)
        return INTERNAL_ERROR


def _debug_trace(console: Console, debug: bool) -> None:
    if debug:
        console.print_exception()


if __name__ == "__main__":
    sys.exit(main())
