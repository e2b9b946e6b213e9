"""``dkit tune-times RUN_DIR``: evaluation times tuned to a finished run's model for a few-step
ODE solver (:func:`~diffusers_kit.solvers.tuning.tune_times`).

The solver is ``--solver`` (a name or YAML mapping) or the spec's ``sample.solver``; the
calibration batch is ``--n`` start-noise draws of ``--seed``, sampled with the spec's
``sample.labels`` and ``sample.guidance`` (those that need no measurements). Prints the
calibration error of the solver's own grid and of the tuned one, and the ``--solver`` mapping
that samples with the tuned times (for ``dkit sample`` or the spec). Writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffusers_kit.cli.main import seed_option
from diffusers_kit.cli.sample import load_run
from diffusers_kit.console import make_console
from diffusers_kit.guidance.base import requested_labels
from diffusers_kit.solvers.ode import ODESolver
from diffusers_kit.solvers.tuning import reference_solution, tune_times
from diffusers_kit.spec.errors import command_line_error


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune-times", help="evaluation times tuned to a run's model for a few-step ODE solver")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("--solver", help="solver name or YAML mapping, e.g. "
                        "\"{kind: unipc, steps: 6}\" (default: the spec's sample.solver)")
    parser.add_argument("--n", type=int, default=256, help="calibration samples (default 256)")
    parser.add_argument("--seed", type=seed_option, default=0,
                        help="seed of the calibration noise (default 0)")
    parser.add_argument("--tries", type=int, default=400,
                        help="most candidate grids to try (default 400)")
    parser.add_argument("--reference-steps", dest="reference_steps", type=int, default=1000,
                        help="steps of the tight reference solve (default 1000)")
    parser.set_defaults(func=tune_times_command)


def tune_times_command(args: argparse.Namespace) -> int:
    for name in ("n", "tries", "reference_steps"):
        if getattr(args, name) < 1:
            raise command_line_error(f"--{name.replace('_', '-')}", "a positive integer",
                                     getattr(args, name))
    spec, components = load_run(args.run_dir, None, args.solver)
    solver = components.solver
    if not isinstance(solver, ODESolver):
        kind = spec.sample.solver["kind"] if spec.sample is not None else None
        raise command_line_error("--solver", "a fixed-step ODE solver (euler, heun, "
                                 "edm_stochastic, dpm_solver_2m, dpm_solver_3m, unipc)", kind)
    diffusion = components.diffusion
    shape = (args.n, *diffusion.network.data_shape)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(
        diffusion.device)
    console = make_console()
    # tuned for what sampling asks of the model: the spec's labels and guidance (a term that
    # needs measurements, a restoration's, has none here and is left out)
    guidance = [term for term in components.guidance if not term.needs_measurement]
    labels = requested_labels(spec.sample.labels, args.n, diffusion.num_classes(guidance))
    with diffusion.sampling_weights() as plain, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=True) as bars:
        model = plain if not guidance and labels is None else plain.guided(
            guidance, None if labels is None else labels.to(diffusion.device), None)
        bars.add_task(f"reference ({args.reference_steps} steps)", total=None)
        reference = reference_solution(model, x_T, args.reference_steps)
        task = bars.add_task("grids tried", total=args.tries + 1)
        tuned = tune_times(model, solver, x_T, reference=reference, max_tries=args.tries,
                           progress=lambda k: bars.advance(task, k))
    kind = spec.sample.solver["kind"]
    table = Table(title=f"dkit tune-times {spec.name}", header_style="bold")
    table.add_column(f"{kind}, {len(tuned.times)} steps: grid")
    table.add_column("error", justify="right")
    table.add_row(f"its own (spacing: {solver.spacing})" if solver.times is None
                  else "its own (given times)", f"{tuned.before:.4g}")
    table.add_row("tuned", f"{tuned.after:.4g}")
    console.print(table)
    if guidance or labels is not None:
        console.print("with the spec's " + " and ".join(
            ([f"labels ({spec.sample.labels})"] if labels is not None else [])
            + ([", ".join(type(term).__name__ for term in guidance)] if guidance else [])),
            soft_wrap=True)
    console.print(f"error: RMS distance to a {args.reference_steps}-step ODE solve from "
                  f"{args.n} calibration draws (seed {args.seed})", soft_wrap=True)
    changed = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)
               if f.name not in ("steps", "times") and getattr(solver, f.name) != f.default}
    settings = {"kind": kind, "steps": len(tuned.times), **changed,
                "times": [float(f"{t:.6g}") for t in tuned.times]}
    console.print(f"{tuned.tried} grids tried; sample with the tuned times:", soft_wrap=True)
    console.print(f"  --solver '{json.dumps(settings)}'", soft_wrap=True, markup=False,
                  highlight=False)
    return 0
