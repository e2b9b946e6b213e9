"""The measured recipes table of ``docs/recipes.md``: DDPM-eps, v-prediction, EDM and flow
matching on the 8x8 digits (the U-Net and training budget of ``specs/ddim.yaml``), each sampled
with every candidate deterministic solver at about 10 and 20 network evaluations, the best
solver per recipe (lowest SWD at 10 NFE) kept for the table; and the consistency-distilled
model at 1, 2 and 4 NFE and the progressively distilled one at its 5 DDIM steps (where their
runs exist).

Every number comes from ``dkit sweep`` on finished runs (one sweep per recipe and solver, the
same sampling seed, 240 samples, the run's held-out split): SWD with 1,024 projections, FD and
the class-histogram distance ``class_tv`` in the digit classifier's features
(``specs/features_digits.yaml``), each with its 95 % interval and its floor (the same statistic
between two real sets). The training time is the run's own (``time_train_s``). Run it from the
folder that holds the runs, after training the specs there:

    OMP_NUM_THREADS=1 dkit --threads 1 run specs/ddim.yaml      # and v_digits, edm_digits,
    OMP_NUM_THREADS=1 python benchmarks/recipes.py --runs runs  # flow_digits, cd_digits
        [--pictures docs/recipes]  # the sample grid of each table row

A solver that does not apply to a recipe's process (a spec error) is reported as such. The
markdown tables go to stdout; ``--json FILE`` keeps every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusers_kit.cli.main import main as dkit  # noqa: E402

FEATURES = REPO / "specs" / "features_digits.yaml"
METRICS = ["{kind: swd, projections: 1024}", f"{{kind: fd, features: {FEATURES}}}",
           f"{{kind: class_accuracy, features: {FEATURES}}}"]
STATISTICS = ("swd", "fd", "class_tv")

#: recipe -> the spec (and run) name
RECIPES = {"DDPM-ε": "ddim", "v-prediction": "v_digits", "EDM": "edm_digits",
           "flow matching": "flow_digits", "DDPM-ε, Min-SNR-5": "min_snr_digits"}
BUDGETS = (10, 20)
#: distilled models: spec name -> (recipe, their sampler, its step counts)
DISTILLED = {"cd_digits": ("consistency-distilled (from EDM)", "consistency", [1, 2, 4]),
             "pd_digits": ("progressively distilled (from v, one halving)", "ddim", [5])}


def candidates(process: str) -> dict[str, tuple[dict[str, Any], list[int]]]:
    """The deterministic solvers tried on a process: name -> (solver mapping without steps,
    the step counts that spend about 10 and 20 evaluations; Heun's k steps cost 2k - 1)."""
    base = {"clip_x0": 1.0}
    grid = {"spacing": "edm"} if process == "ve" else {}
    solvers: dict[str, tuple[dict[str, Any], list[int]]] = {}
    if process == "ddpm":
        solvers["ddim"] = ({"kind": "ddim", "eta": 0.0, **base}, list(BUDGETS))
    for kind in ("euler", "dpm_solver_2m", "dpm_solver_3m", "unipc"):
        solvers[kind] = ({"kind": kind, **grid, **base}, list(BUDGETS))
    solvers["heun"] = ({"kind": "heun", **grid, **base}, [(b + 1) // 2 for b in BUDGETS])
    return solvers


def sweep(run: Path, field: str, values: list[Any], overrides: list[str],
          n: int | None) -> dict[str, Any] | str:
    """One ``dkit sweep``; its sweep.json, or the error text when dkit refused (exit 2)."""
    before = set((run / "sweeps").glob("*")) if (run / "sweeps").is_dir() else set()
    args = ["sweep", str(run), f"{field}={','.join(str(v) for v in values)}", *overrides,
            "--metrics", *METRICS, "--quiet"]
    if n is not None:
        args += ["--n", str(n)]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = dkit(args)
    if code != 0:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {code}"
    (folder,) = set((run / "sweeps").glob("*")) - before
    record = json.loads((folder / "sweep.json").read_text())
    record["folder"] = str(folder)
    return record


def figure(metrics: dict[str, Any], name: str) -> str:
    value, low, high = (metrics.get(k) for k in (name, f"{name}_low", f"{name}_high"))
    if value is None:
        return "n/a"
    digits = ".3g" if name != "fd" else ".2f"
    return f"{value:{digits}} [{low:{digits}}, {high:{digits}}]"


def training_time(run: Path) -> str:
    metrics = json.loads((run / "metrics.json").read_text())
    took = metrics.get("time_train_s")
    record = json.loads((run / "run.json").read_text())
    return (f"{took / 60:.1f} min ({record.get('step', '?')} steps, {run.name})"
            if isinstance(took, (int, float)) else f"reused ({run.name})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"),
                        help="the output root holding <name>/latest of each spec")
    parser.add_argument("--n", type=int, help="samples per setting (default: the specs' 240)")
    parser.add_argument("--pictures", type=Path,
                        help="copy each table row's sample grid here as <spec>_<nfe>.png")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--only", nargs="*", metavar="NAME",
                        help="only these of the recipes' runs (none: --only alone)")
    parser.add_argument("--distilled", nargs="*", metavar="NAME", default=list(DISTILLED),
                        choices=list(DISTILLED),
                        help="the distilled models measured (a missing run is skipped)")
    args = parser.parse_args(argv)
    found: dict[str, Any] = {}
    rows: list[list[str]] = []
    floors: dict[str, Any] = {}
    pictures: list[tuple[Path, str]] = []
    for recipe, name in RECIPES.items():
        if args.only is not None and name not in args.only:
            continue
        run = (args.runs / name / "latest").resolve()
        process = yaml.safe_load((run / "spec.yaml").read_text())["process"]["kind"]
        tried: dict[str, Any] = {}
        for solver, (mapping, steps) in candidates(process).items():
            record = sweep(run, "sample.solver.steps", steps,
                           [f"sample.solver={json.dumps(mapping)}"], args.n)
            tried[solver] = record
            print(f"{name} {solver}: "
                  + (record if isinstance(record, str) else " ".join(
                      f"{p['nfe']} NFE swd {p['metrics']['swd']:.4f}"
                      for p in record["points"])), file=sys.stderr, flush=True)
        usable = {k: v for k, v in tried.items() if not isinstance(v, str)}
        best = min(usable, key=lambda k: usable[k]["points"][0]["metrics"]["swd"])
        found[name] = {"recipe": recipe, "best": best, "tried": tried}
        for index, point in enumerate(usable[best]["points"]):
            m = point["metrics"]
            floors = floors or m
            rows.append([recipe if index == 0 else "", f"`{name}`" if index == 0 else "",
                         f"`{best}`, {point['value']} steps", str(point["nfe"]),
                         *(figure(m, s) for s in STATISTICS),
                         training_time(run) if index == 0 else ""])
            pictures.append((Path(usable[best]["folder"]) / point["samples"],
                             f"{name}_{point['nfe']}.png"))
    for name in args.distilled:
        recipe, solver, steps = DISTILLED[name]
        distilled = (args.runs / name / "latest").resolve()
        if not (distilled / "spec.yaml").is_file():
            print(f"{name}: no finished run under {args.runs}", file=sys.stderr)
            continue
        record = sweep(distilled, "sample.solver.steps", steps, [], args.n)
        assert not isinstance(record, str), record
        found[name] = {"recipe": recipe, "best": solver, "tried": {solver: record}}
        for index, point in enumerate(record["points"]):
            m = point["metrics"]
            floors = floors or m
            rows.append([recipe if index == 0 else "", f"`{name}`" if index == 0 else "",
                         f"`{solver}`, {point['value']} steps", str(point["nfe"]),
                         *(figure(m, s) for s in STATISTICS),
                         training_time(distilled) + " + the teacher's" if index == 0 else ""])
            pictures.append((Path(record["folder"]) / point["samples"],
                             f"{name}_{point['nfe']}.png"))

    header = ["recipe", "spec", "solver (best at 10 NFE)", "NFE", "SWD", "FD",
              "class-histogram TV", "training"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("| real data (floor) | | | | " + " | ".join(
        figure({s: floors.get(f"{s}_floor"), f"{s}_low": floors.get(f"{s}_floor_low"),
                f"{s}_high": floors.get(f"{s}_floor_high")}, s) for s in STATISTICS) + " | |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    solvers = sorted({s for name, v in found.items() for s in v["tried"]
                      if name not in DISTILLED})
    if solvers:
        print()
        print("SWD of every solver tried (10 / 20 NFE budgets; Heun 9 / 19):")
        print()
        print("| spec | " + " | ".join(solvers) + " |")
        print("|---|" + "---|" * len(solvers))
    for name, entry in found.items():
        if name in DISTILLED:
            continue
        cells = []
        for solver in solvers:
            record = entry["tried"].get(solver)
            if record is None:
                cells.append("")
            elif isinstance(record, str):
                cells.append("does not apply")
            else:
                cells.append(" / ".join(f"{p['metrics']['swd']:.3f}" for p in record["points"]))
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    if args.pictures is not None:
        args.pictures.mkdir(parents=True, exist_ok=True)
        for source, target in pictures:
            shutil.copyfile(source, args.pictures / target)
    if args.json is not None:
        args.json.write_text(json.dumps(found, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
