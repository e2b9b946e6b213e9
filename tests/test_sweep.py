"""``dkit sweep``: a finished run sampled at several settings of one field, its metrics per
setting in sweep.json, the metric-vs-setting plot (report.metric_plot), and clean errors.
One tiny class-conditional 2-D model is trained once (a few seconds) for the whole file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from diffusers_kit.cli.sweep import parse_sweep, setting_labels, split_values
from diffusers_kit.report import Series, metric_plot, nice_ticks, tick_labels
from tests.helpers import run_cli, write_spec

TOY = """\
name: toy
seed: 0
device: cpu
data: {kind: gaussian_mixture, components: 4, radius: 2.0, std: 0.15, n_train: 400,
       n_heldout: 100}
process: {kind: ddpm, num_steps: 100}
network: {kind: mlp, width: 16, blocks: 1, prediction: eps, num_classes: 4,
          class_dropout: 0.2}
objective: {kind: ddpm_simple}
train: {steps: 10, batch_size: 64, log_every: 5}
sample:
  n: 40
  labels: all
  guidance: [{kind: classifier_free, scale: 1.0}]
  solver: {kind: ddim, steps: 5}
evaluate:
  metrics:
    - {kind: swd, projections: 16, resamples: 10}
output: {root: {root}}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from diffusers_kit.cli.main import main

    tmp = tmp_path_factory.mktemp("sweep")
    assert main(["run", str(write_spec(tmp, TOY)), "--quiet"]) == 0
    return next(p for p in (tmp / "runs" / "toy").iterdir() if p.name != "latest")


def files_outside_sweeps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and "sweeps" not in p.relative_to(folder).parts}


def the_sweep(run_dir: Path, field: str) -> Path:
    (folder,) = sorted((run_dir / "sweeps").glob(f"{field}-*"))[-1:]
    return folder


def test_sweep_over_steps_writes_metrics_nfe_plot_and_grids(run_dir, capsys):
    before = files_outside_sweeps(run_dir)
    code, out, err = run_cli(["sweep", str(run_dir), "sample.solver.steps=2,4", "--metrics",
                              "swd", "--quiet"], capsys)
    assert code == 0, err
    assert files_outside_sweeps(run_dir) == before  # the run's own files are not touched
    folder = the_sweep(run_dir, "sample.solver.steps")
    record = json.loads((folder / "sweep.json").read_text())
    assert record["field"] == "sample.solver.steps" and record["values"] == ["2", "4"]
    assert [p["value"] for p in record["points"]] == [2, 4]
    assert [p["nfe"] for p in record["points"]] == [2, 4]  # one (batched CFG) call per step
    for point in record["points"]:
        metrics = point["metrics"]
        assert metrics["swd_low"] <= metrics["swd"] <= metrics["swd_high"]
        assert metrics["swd_floor"] == record["points"][0]["metrics"]["swd_floor"]
        assert metrics["swd_n"] == 40 and point["seconds"] >= 0
        assert point["sampling"]["solver"]["steps"] == point["value"]
        assert (folder / point["samples"]).is_file()
    # the first two statistics; out_of_range is reported where a sample is out of range
    # (2 of 40 at 2 steps with the Philox streams)
    assert record["plot"] == ["swd", "out_of_range"]
    assert {p.name for p in folder.iterdir()} == {
        "sweep.json", "sweep.png", "samples_2.png", "samples_2.npz", "samples_4.png",
        "samples_4.npz"}
    with Image.open(folder / "sweep.png") as picture:
        assert 600 <= picture.width <= 2000 and 400 <= picture.height <= 1000
        assert len(picture.convert("RGB").getcolors(1 << 16) or []) > 10  # not blank
    table = " ".join(out.split())
    assert "swd" in table and "floors (real data)" in table
    assert str(record["points"][1]["nfe"]) in table


def test_sweep_over_a_list_item_and_over_whole_values(run_dir, capsys):
    # a number in the path is a list index: the scale of the first guidance term
    code, _, err = run_cli(["sweep", str(run_dir), "sample.guidance.0.scale=0,3", "--n", "8",
                            "--quiet"], capsys)
    assert code == 0, err
    record = json.loads((the_sweep(run_dir, "sample.guidance.0.scale") / "sweep.json")
                        .read_text())
    assert [p["sampling"]["guidance"][0]["scale"] for p in record["points"]] == [0, 3]
    assert all(p["sampling"]["n"] == 8 for p in record["points"])
    # whole values: commas inside braces do not split
    code, _, err = run_cli(["sweep", str(run_dir), "sample.solver={kind: ddim, steps: 2},"
                            "{kind: ddim, steps: 3, eta: 1.0}", "sample.n=8", "--quiet"], capsys)
    assert code == 0, err
    folder = the_sweep(run_dir, "sample.solver")
    record = json.loads((folder / "sweep.json").read_text())
    assert [p["nfe"] for p in record["points"]] == [2, 3]
    assert (folder / "samples_kind_ddim_steps_3_eta_1.0.png").is_file()


@pytest.mark.parametrize(("args", "named"), [
    (["sample.solver.stepz=2,4"], "sample.solver.stepz"),
    (["sample.solver.steps=2,two"], "sample.solver.steps"),
    (["sample.solver.steps=2,,4"], "sample.solver.steps"),
    (["sample.solver.steps"], "sample.solver.steps"),
    (["sample.solver.steps=2,4", "--n", "0"], "--n"),
    (["sample.solver.steps=2", "--plot", "fid", "--quiet"], "--plot"),
])
def test_mistakes_exit_2_naming_the_field_and_leave_nothing(run_dir, capsys, args, named):
    before = set((run_dir / "sweeps").glob("*")) if (run_dir / "sweeps").is_dir() else set()
    code, out, err = run_cli(["sweep", str(run_dir), *args], capsys)
    assert code == 2, out + err
    assert named in err and "Traceback" not in err
    after = set((run_dir / "sweeps").glob("*")) if (run_dir / "sweeps").is_dir() else set()
    assert after == before


def test_a_folder_without_a_checkpoint_is_a_spec_error(tmp_path, capsys):
    code, _, err = run_cli(["sweep", str(tmp_path), "sample.solver.steps=2,4"], capsys)
    assert code == 2 and "RUN_DIR" in err
    assert list(tmp_path.iterdir()) == []


def test_a_specs_runs_folder_is_refused_with_its_newest_run_suggested(run_dir, capsys):
    """``runs/NAME`` (the folder holding ``latest``) given where a run folder is expected: each
    command's refusal suggests ``runs/NAME/latest``; a folder without ``latest`` gets none."""
    from diffusers_kit.spec.references import ModelReferenceError, find_run_folder

    runs = run_dir.parent
    newest = f"did you mean {str(runs / 'latest')!r}?"
    for args in (["sweep", str(runs), "sample.solver.steps=2,4"], ["sample", str(runs)],
                 ["tune-times", str(runs)]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "RUN_DIR" in err and newest in " ".join(err.split()), err
    spec = write_spec(runs.parent.parent, TOY, "again.yaml")
    code, _, err = run_cli(["run", str(spec), "--only", "sample", "--from", str(runs),
                            "--quiet"], capsys)
    assert code == 2 and "--from" in err and newest in " ".join(err.split()), err
    code, _, err = run_cli(["run", str(spec), "--resume", str(runs), "--quiet"], capsys)
    assert code == 2 and "--resume" in err and newest in " ".join(err.split()), err
    with pytest.raises(ModelReferenceError, match="did you mean") as refused:
        find_run_folder(str(runs))
    assert str(runs / "latest") in str(refused.value)
    code, _, err = run_cli(["sample", str(run_dir / "sampling")], capsys)
    assert code == 2 and "did you mean" not in err


def test_values_split_at_top_level_commas_and_label_by_what_differs():
    assert split_values("2, 4,8") == ["2", "4", "8"]
    assert split_values("{kind: ddim, steps: 5},[1, 2],'a,b'") == [
        "{kind: ddim, steps: 5}", "[1, 2]", "'a,b'"]
    assert parse_sweep("sample.guidance.0.scale=0,1") == ("sample.guidance.0.scale", ["0", "1"])
    assert setting_labels(["{kind: ddim, steps: 5}", "{kind: dpm_solver_2m, steps: 5}"]) == [
        "ddim", "dpm_solver_2m"]
    assert setting_labels(["{kind: ddim, eta: 0}", "{kind: ddim, eta: 1}"]) == ["eta=0", "eta=1"]


def test_metric_plot_draws_two_axes_gaps_and_a_single_setting():
    series = [Series("fd", [2.0, None, math.nan, 5.0], [1.5, None, None, 4.0],
                     [2.5, None, None, 6.0], floor=0.5),
              Series("class accuracy", [0.2, 0.5, 0.9, 0.95], floor=[0.9, 0.9, 0.95, None],
                     axis="right", bounds=(0.0, 1.0), digits=".2f")]
    image = metric_plot(["0", "1", "3", "8"], series, "title", "scale")
    assert image.mode == "RGB" and image.size == (600, 440)
    colours = {c for _, c in image.getcolors(1 << 16)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # both series drawn
    single = metric_plot(["only"], [Series("swd", [0.3], [0.2], [0.4])], "one", "x")
    assert single.size == (600, 440)
    empty = metric_plot(["a", "b"], [Series("swd", [None, math.nan])], "none", "x")
    assert empty.size == (600, 440)  # no values: an empty axis, "(no values)" in the legend
    wide = metric_plot([f"setting {i}" for i in range(12)], [Series("swd", list(range(12)))],
                       "many", "x")
    assert wide.width > 600
    with pytest.raises(ValueError, match="axis"):
        metric_plot(["a"], [Series("swd", [1.0], axis="top")], "t", "x")
    with pytest.raises(ValueError, match="2 values for 1 settings"):
        metric_plot(["a"], [Series("swd", [1.0, 2.0])], "t", "x")


def test_nice_ticks_and_their_labels():
    assert nice_ticks(14.2) == [0, 5, 10, 15]  # the guidance benchmark's FD axis
    assert tick_labels(nice_ticks(1.0)) == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    ticks = nice_ticks(0.3, -0.12)
    assert ticks[0] <= -0.12 and ticks[-1] >= 0.3 and 0 in [round(t, 9) for t in ticks]
    assert len(nice_ticks(7.0, 7.0)) > 1  # a single value still gets an axis


def test_the_best_value_is_picked_by_the_metric_and_direction_asked(run_dir, capsys):
    code, out, err = run_cli(["sweep", str(run_dir), "sample.solver.steps=2,3,5", "--metrics",
                              "swd", "--best", "max:swd", "--quiet"], capsys)
    assert code == 0, err
    record = json.loads((the_sweep(run_dir, "sample.solver.steps") / "sweep.json").read_text())
    figures = [p["metrics"]["swd"] for p in record["points"]]
    assert record["best"]["direction"] == "max"
    assert record["best"]["value"] == [2, 3, 5][figures.index(max(figures))]
    assert f"best by swd (highest): sample.solver.steps={record['best']['text']}" in out


@pytest.mark.parametrize("best", ["nosuch", "most:swd", "max:"])
def test_a_bad_best_metric_is_refused(run_dir, capsys, best):
    code, _, err = run_cli(["sweep", str(run_dir), "sample.solver.steps=2,3", "--metrics",
                            "swd", "--best", best, "--quiet"], capsys)
    assert code == 2 and "--best" in err and "Traceback" not in err
