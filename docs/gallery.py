"""Regenerate the gallery page (``docs/gallery.md`` and ``docs/gallery/<spec>.png``) from
finished runs of every shipped spec, so that the page never goes stale.

    OMP_NUM_THREADS=1 python docs/gallery.py --root runs [--root MORE_RUNS] [--run-missing] \
        [--specs specs/*.yaml plugins/dkit-example/specs/bars.yaml]

For each spec that samples or restores, the newest finished run (under any ``--root``) whose
``spec.yaml`` has the spec's ``name`` and which wrote its picture gives the section: the
picture, the command, the spec's own first comment lines, its metrics (value [low, high],
floor [low, high], n: :func:`diffusers_kit.metrics.floor.summarize`), its times and the
machine. Specs that only train (no ``sample`` and no ``restore`` section: the metric feature
network, the guidance classifier) get one row each in a "trained models" table. With
``--run-missing``, ``dkit run SPEC output.root=ROOT`` (the first root) is run, one spec at a
time, for every spec without such a run. Specs still without a run are listed as such, unless
``--keep`` is given: then a spec without a run under the roots keeps its row, section and
picture from the existing page (to add or refresh some specs' sections on a machine that lacks
the other specs' runs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from diffusers_kit.metrics.floor import summarize
from diffusers_kit.references import ModelRef
from diffusers_kit.run_folder import follow_latest, read_record, run_folders

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
PICTURES = ("samples.png", "restore.png")
MACHINE = "one thread (`OMP_NUM_THREADS=1`) of a shared 2-core CPU, no GPU"
# keys of metrics.json that are not statistics (shown elsewhere, or not at all)
NOT_STATISTICS = ("train_hash", "dependencies", "checkpoint_from", "restore", "nfe",
                  "train_loss", "seconds")
# spec fields whose value may differ between the shipped spec and its run without changing
# the result (where it ran, where it wrote)
NOT_COMPARED = ("device", "output")


# -- the specs -------------------------------------------------------------------------------
class Spec:
    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.raw: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        self.name: str = str(self.raw.get("name") or path.stem)
        if "restore" in self.raw:
            self.kind = "restore"
        elif "sample" in self.raw:
            self.kind = "sample"
        else:
            self.kind = "train"

    @property
    def shown_path(self) -> str:
        try:
            return self.path.relative_to(REPO).as_posix()
        except ValueError:
            return str(self.path)

    @property
    def command(self) -> str:
        return f"dkit run {self.shown_path}"

    @property
    def description(self) -> str:
        """The spec file's first comment block, without the schema line."""
        lines: list[str] = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if not stripped.startswith("#"):
                break
            text = stripped.lstrip("#")
            if "yaml-language-server" in text:
                continue
            lines.append(text[1:] if text.startswith(" ") else text)
        # prose lines joined into paragraphs; indented lines (a formula) kept as a block
        blocks: list[tuple[bool, list[str]]] = []
        for line in lines:
            code = line.startswith("    ")
            if not line.strip():
                blocks.append((False, []))
            elif blocks and blocks[-1][0] == code:
                blocks[-1][1].append(line)
            else:
                blocks.append((code, [line]))
        out = []
        for code, block in blocks:
            if code:
                out.append("```text\n" + "\n".join(b[4:] for b in block) + "\n```")
            elif block:
                out.append(" ".join(b.strip() for b in block))
        return "\n\n".join(out)

    @property
    def summary(self) -> str:
        """The description's first sentence."""
        first = self.description.split("\n\n")[0]
        return re.split(r"(?<=[a-z)\]])\. (?=[A-Z])", first)[0].rstrip(".:,") + "."


# -- the runs --------------------------------------------------------------------------------
class Run:
    def __init__(self, folder: Path, record: dict[str, Any]) -> None:
        self.folder = folder
        self.record = record
        try:
            self.metrics: dict[str, Any] = json.loads(
                (folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.metrics = dict(record.get("metrics") or {})

    @property
    def picture(self) -> Path | None:
        for name in PICTURES:
            if (self.folder / name).is_file():
                return self.folder / name
        return None

    @property
    def evaluated(self) -> bool:
        return "evaluate" in (self.record.get("stages") or [])

    @property
    def wall_s(self) -> float | None:
        try:
            start = _dt.datetime.fromisoformat(str(self.record["started"]))
            end = _dt.datetime.fromisoformat(str(self.record["finished"]))
        except (KeyError, ValueError):
            return None
        return (end - start).total_seconds()


def spec_name(folder: Path) -> str | None:
    try:
        data = yaml.safe_load((folder / "spec.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return str(data.get("name")) if isinstance(data, dict) else None


def find_run(spec: Spec, roots: list[Path]) -> Run | None:
    """The newest finished run of ``spec`` under ``roots`` with what the gallery shows: its
    picture (a sampling or restoration spec) or its evaluation (a spec that only trains;
    failing that, its newest finished training)."""
    best: tuple[tuple[Any, ...], Run] | None = None
    for root in roots:
        latest = root / spec.name / "latest"
        latest_target = follow_latest(latest).resolve() if latest.exists() else None
        for folder in run_folders(root, spec.name):
            record = read_record(folder)
            if not record or record.get("status") != "finished" or spec_name(folder) != spec.name:
                continue
            run = Run(folder, record)
            if spec.kind != "train" and run.picture is None:
                continue
            key = (run.evaluated, str(record.get("finished", "")),
                   folder.resolve() == latest_target)
            if best is None or key > best[0]:
                best = (key, run)
    return best[1] if best else None


def locate(reference: str | None, roots: list[Path]) -> Run | None:
    """A run folder named in a record (``runs/ddpm/2026...``, relative to the directory the
    run was started in): tried as written, then below each root's parent and each root."""
    if not reference:
        return None
    path = Path(reference)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    for root in roots:
        candidates += [root.parent / path, root / Path(*path.parts[-2:])]
    for folder in candidates:
        record = read_record(folder)
        if record is not None:
            return Run(folder, record)
    return None


def changed_fields(raw: Any, ran: Any, path: str = "") -> list[str]:
    """Fields of the shipped spec whose value differs from the run's resolved ``spec.yaml``
    (the resolved spec fills every default, so only the shipped spec's own fields count)."""
    if isinstance(raw, dict) and isinstance(ran, dict) and "spec" in raw and "spec" in ran:
        # a model reference with overrides: the run records them as a list (and the run it
        # resolved to, with its hash); compare what was asked for, in one form
        asked, used = ModelRef.parse(raw), ModelRef.parse({k: v for k, v in ran.items()
                                                            if k in ("spec", "overrides")})
        return [] if (asked.spec, asked.overrides) == (used.spec, used.overrides) else [path]
    if isinstance(raw, dict) and isinstance(ran, dict):
        out = []
        for key, value in raw.items():
            if not path and key in NOT_COMPARED:
                continue
            sub = f"{path}.{key}" if path else str(key)
            out += (changed_fields(value, ran[key], sub) if key in ran else [sub])
        return out
    if isinstance(raw, list) and isinstance(ran, list):
        if len(raw) != len(ran):
            return [path]
        return [f for i, (a, b) in enumerate(zip(raw, ran, strict=True)) for f in
                changed_fields(a, b, f"{path}[{i}]")]
    if isinstance(raw, str) and raw.endswith((".yaml", ".yml")):
        return []  # a model reference: the run records the run it resolved to
    if isinstance(raw, (int, float)) and isinstance(ran, (int, float)) \
            and not isinstance(raw, bool):
        return [] if float(raw) == float(ran) else [path]
    return [] if raw == ran else [path]


def stale_fields(spec: Spec, run: Run) -> list[str]:
    try:
        ran = yaml.safe_load((run.folder / "spec.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return changed_fields(spec.raw, ran)


# -- formatting ------------------------------------------------------------------------------
def seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    value = float(value)
    if value >= 90:
        return f"{value / 60:.1f} min"
    return f"{value:.3g} s" if value < 10 else f"{value:.0f} s"


def statistics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items()
            if k not in NOT_STATISTICS and not k.startswith("time_")
            and isinstance(v, (int, float))}


def metric_rows(run: Run) -> list[tuple[str, str]]:
    rows = summarize(statistics(run.metrics))
    restore = run.metrics.get("restore")
    if isinstance(restore, dict):
        rows += summarize(statistics(restore))
    return rows


def key_metric(run: Run) -> str:
    """The one number of the overview table."""
    m = run.metrics
    restore = m.get("restore") if isinstance(m.get("restore"), dict) else {}
    parts = []
    if "swd_ratio" in m:
        parts.append(f"SWD {m['swd_ratio']:.2f}× its floor")
    if "fd" in m and "fd_floor" in m:
        parts.append(f"FD {m['fd']:.3g} (floor {m['fd_floor']:.3g})")
    if "class_accuracy" in m:
        parts.append(f"class accuracy {m['class_accuracy']:.3g}")
    if parts:
        return ", ".join(parts)
    if "psnr" in restore:
        text = f"PSNR {restore['psnr']:.3g} dB"
        if "pinv_psnr" in restore:
            text += f" (pseudo-inverse {restore['pinv_psnr']:.3g} dB)"
        return text
    rows = summarize(statistics(m))
    return f"{rows[0][0]} {rows[0][1]}" if rows else "n/a"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class Timing:
    """Training time (own or of the reused run), other trained models, sampling time."""

    def __init__(self, run: Run, roots: list[Path]) -> None:
        m = run.metrics
        self.reused_from = None
        if run.record.get("trained", True) and "time_train_s" in m:
            self.train = f"{seconds(m['time_train_s'])}"
        else:
            source = m.get("checkpoint_from") or run.record.get("checkpoint_from")
            found = locate(source, roots)
            if found is not None and "time_train_s" in found.metrics:
                self.train = f"{seconds(found.metrics['time_train_s'])} (reused)"
            elif source:
                self.train = "reused (time not found)"
            else:
                self.train = "none"
            self.reused_from = source
        self.others: list[str] = []
        seen = {self.reused_from}
        for dep in m.get("dependencies") or []:
            field = str(dep.get("field", ""))
            if field.startswith("evaluate.") or field == "model" or dep.get("run") in seen:
                continue
            seen.add(dep.get("run"))
            found = locate(dep.get("run"), roots)
            took = seconds(found.metrics.get("time_train_s")) if found else "n/a"
            # reused: a finished run of the referenced spec; False: built by this run; None: a
            # run folder given in the spec or on the command line
            how = {True: "reused", False: "trained by this run"}.get(dep.get("reused"), "given")
            self.others.append(f"{dep.get('reference')}: {took} ({how})")
        self.stage = "restore" if "time_restore_s" in m else "sample"
        self.sample = seconds(m.get(f"time_{self.stage}_s"))
        self.evaluate = seconds(m.get("time_evaluate_s"))
        restore = m.get("restore") if isinstance(m.get("restore"), dict) else {}
        nfe = m.get("nfe", restore.get("nfe"))
        self.nfe = f"{nfe:.0f}" if isinstance(nfe, (int, float)) else "n/a"


# -- the page --------------------------------------------------------------------------------
class Kept:
    """What an existing page says about each spec: its overview row, its section (up to the
    next heading) and its row of the trained-models table, by spec name."""

    def __init__(self, page: Path | None) -> None:
        self.rows: dict[str, str] = {}
        self.sections: dict[str, list[str]] = {}
        self.trained: dict[str, str] = {}
        if page is None or not page.is_file():
            return
        current: str | None = None
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("## "):
                current = line[3:].strip()
                if current != "Trained models":
                    self.sections[current] = []
            elif current is not None and current != "Trained models":
                self.sections[current].append(line)
            if found := re.match(r"\| \[`([^`]+)`\]\(#", line):
                self.rows[found.group(1)] = line
            elif current == "Trained models" and (found := re.match(r"\| `([^`]+)` \|", line)):
                self.trained[found.group(1)] = line

    def has(self, name: str) -> bool:
        return name in self.rows or name in self.trained


def write_page(specs: list[Spec], runs: dict[str, Run | None], roots: list[Path],
               out: Path, invocation: str, kept: Kept | None = None) -> list[str]:
    pictures = out.parent / "gallery"
    pictures.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    shown = [s for s in specs if s.kind != "train"]
    trained = [s for s in specs if s.kind == "train"]
    kept = kept or Kept(None)
    missing = [s.name for s in specs if runs.get(s.name) is None and not kept.has(s.name)]

    lines = [
        "# Gallery",
        "",
        "Every shipped spec that samples or restores, run as shipped: its picture, its metrics",
        "(value [low, high] with the floor — the same statistic between two real sets of the",
        "same size — and its own [low, high]; see [Evaluating samples](evaluation.md)), its",
        f"time and the command that makes it. Machine: {MACHINE}.",
        "",
        "!!! note \"Generated — do not edit by hand\"",
        f"    This page and `docs/gallery/` are written by `{invocation}` from finished runs",
        "    (`--run-missing` runs the specs that have none). Regenerate it after changing a",
        "    spec.",
        "",
    ]
    if missing:
        lines += [f"**Not measured yet:** {', '.join(f'`{n}`' for n in missing)} "
                  "(no finished run found).", ""]
    lines += ["| spec | key result | training | sampling / restoration | run |",
              "|---|---|---|---|---|"]
    for spec in shown:
        run = runs.get(spec.name)
        if run is None and spec.name in kept.rows:
            lines.append(kept.rows[spec.name])
            continue
        if run is None:
            lines.append(f"| [`{spec.name}`](#{spec.name}) | not measured yet | | | |")
            continue
        timing = Timing(run, roots)
        lines.append(f"| [`{spec.name}`](#{spec.name}) | {cell(key_metric(run))} | "
                     f"{timing.train} | {timing.sample} ({timing.nfe} NFE) | "
                     f"{run.folder.name} |")
    lines.append("")

    for spec in shown:
        run = runs.get(spec.name)
        if run is None and spec.name in kept.sections:
            lines += [f"## {spec.name}", *kept.sections[spec.name]]
            if (pictures / f"{spec.name}.png").is_file():
                written.add(f"{spec.name}.png")
            continue
        lines += [f"## {spec.name}", "", spec.description, "", "```bash",
                  f"OMP_NUM_THREADS=1 {spec.command}", "```", ""]
        if run is None:
            lines += ["*Not measured yet: no finished run of this spec.*", ""]
            continue
        picture = run.picture
        assert picture is not None
        shutil.copyfile(picture, pictures / f"{spec.name}.png")
        written.add(f"{spec.name}.png")
        what = "restorations" if picture.name == "restore.png" else "samples"
        lines += [f"![{spec.name}: {what}](gallery/{spec.name}.png)", ""]
        timing = Timing(run, roots)
        facts = [f"training {timing.train}"]
        if timing.others:
            facts.append("other models " + ", ".join(timing.others))
        facts += [f"{'restoration' if timing.stage == 'restore' else 'sampling'} "
                  f"{timing.sample} ({timing.nfe} NFE)", f"evaluation {timing.evaluate}"]
        if run.wall_s is not None:
            facts.append(f"this run's wall time {seconds(run.wall_s)}")
        lines += ["Time: " + "; ".join(facts) + ".", ""]
        if "train_loss" in run.metrics:
            lines += [f"Final training loss: {run.metrics['train_loss']:.4g}.", ""]
        rows = metric_rows(run)
        if rows:
            lines += ["| statistic | value [low, high], floor [low, high], n |", "|---|---|"]
            lines += [f"| `{name}` | {cell(text)} |" for name, text in rows]
            lines.append("")
        stale = stale_fields(spec, run)
        if stale:
            lines += ["!!! warning \"The spec changed since this run\"",
                      f"    Fields that differ: {', '.join(f'`{f}`' for f in stale)}. "
                      "Rerun it and regenerate this page.", ""]
        lines += [f"Run `{run.folder.parent.name}/{run.folder.name}`, finished "
                  f"{run.record.get('finished', 'n/a')}.", ""]

    if trained:
        lines += ["## Trained models", "",
                  "Specs that only train: a model the specs above reference (built once, or",
                  "reused when a finished run has its training hash).", "",
                  "| spec | what it is | command | held-out metric | training |",
                  "|---|---|---|---|---|"]
        for spec in trained:
            run = runs.get(spec.name)
            what = spec.summary
            if run is None and spec.name in kept.trained:
                lines.append(kept.trained[spec.name])
                continue
            if run is None:
                lines.append(f"| `{spec.name}` | {cell(what)} | `{spec.command}` | "
                             "not measured yet | |")
                continue
            rows = summarize(statistics(run.metrics))
            metric = "; ".join(f"{n}: {t}" for n, t in rows) if rows else (
                "not evaluated (built as another spec's dependency)")
            lines.append(f"| `{spec.name}` | {cell(what)} | `{spec.command}` | "
                         f"{cell(metric)} | {Timing(run, roots).train} |")
        lines.append("")

    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    for old in pictures.glob("*.png"):
        if old.name not in written:
            old.unlink()
    return missing


def run_missing(specs: list[Spec], root: Path) -> None:
    dkit = shutil.which("dkit") or str(Path(sys.executable).parent / "dkit")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for spec in specs:
        command = [dkit, "run", str(spec.path), f"output.root={root}"]
        print("$", " ".join(command), flush=True)
        start = _dt.datetime.now()
        code = subprocess.call(command, env=env)
        took = (_dt.datetime.now() - start).total_seconds()
        print(f"{spec.name}: exit {code} after {seconds(took)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", action="append", type=Path,
                        help="a folder of runs (repeatable; default: runs)")
    parser.add_argument("--specs", nargs="+", type=Path,
                        help="spec files (default: specs/*.yaml and the example plugin's)")
    parser.add_argument("--run-missing", action="store_true",
                        help="dkit run each spec without a finished run (into the first root)")
    parser.add_argument("--out", type=Path, default=DOCS / "gallery.md",
                        help="the page to write (its pictures go to gallery/ beside it)")
    parser.add_argument("--keep", action="store_true",
                        help="a spec without a run under the roots keeps what the existing "
                             "page shows for it (row, section, picture)")
    args = parser.parse_args(argv)
    roots = [r.resolve() for r in (args.root or [Path("runs")])]
    paths = args.specs or [*sorted((REPO / "specs").glob("*.yaml")),
                           REPO / "plugins/dkit-example/specs/bars.yaml"]
    specs = [Spec(p) for p in paths]

    def find_all() -> dict[str, Run | None]:
        return {s.name: find_run(s, roots) for s in specs}

    runs = find_all()
    if args.run_missing:
        todo = [s for s in specs if runs[s.name] is None
                or (s.kind == "train" and not runs[s.name].evaluated)]
        run_missing(todo, roots[0])
        runs = find_all()
    invocation = "OMP_NUM_THREADS=1 python docs/gallery.py --root RUNS"
    kept = Kept(args.out.resolve()) if args.keep else None
    missing = write_page(specs, runs, roots, args.out.resolve(), invocation, kept)
    for spec in specs:
        run = runs[spec.name]
        print(f"{spec.name:22} {run.folder if run else 'NOT MEASURED'}")
    print(f"wrote {args.out}" + (f"; not measured yet: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
