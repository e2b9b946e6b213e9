"""diffusers flow-matching pipelines as dkit models, with diffusers itself as the oracle.

A tiny random ``UNet2DModel`` (``tests/test_diffusers_import.py``'s) is saved beside a
``FlowMatchEulerDiscreteScheduler`` config and used as a flow-matching model: the
``diffusers_flow`` process (the linear path at ``t = sigma``, SD3's shift, diffusers' grid)
and ``diffusers_unet`` with the ``velocity`` prediction at timestep ``sigma T``. Also here:
``dkit likelihood`` on imported folders (DDPM and flow). Nothing is downloaded.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_kit.diffusion import Diffusion  # noqa: E402
from diffusers_kit.networks.diffusers_unet import DiffusersUNet, flow_timestep  # noqa: E402
from diffusers_kit.processes import DDPM, DiffusersFlow, DiffusersSchedule, Flow  # noqa: E402
from diffusers_kit.processes.flow import shift_time, unshift_time  # noqa: E402
from diffusers_kit.solvers import DDIM, EulerODE  # noqa: E402
from diffusers_kit.solvers.grids import sampling_times  # noqa: E402
from diffusers_kit.testing import check_process  # noqa: E402
from tests.helpers import run_cli  # noqa: E402
from tests.test_diffusers_import import SHORT, diffusers_loop, save_pipeline, tiny_unet  # noqa: E402

SHIFTS = [1.0, 3.0]


def save_flow(folder: Path, shift: float = 1.0,
              scheduler: type | None = None, **config) -> diffusers.DDPMPipeline:  # type: ignore[type-arg]
    """A tiny U-Net beside a flow-matching scheduler config. ``DDPMPipeline`` only as the
    folder's frame (``DDIMPipeline`` would turn the scheduler into a DDIM one); diffusers has no
    unconditional flow-matching pipeline for a ``UNet2DModel``."""
    kind = scheduler or diffusers.FlowMatchEulerDiscreteScheduler
    pipeline = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=kind(shift=shift, **config))
    pipeline.save_pretrained(folder)
    return pipeline


def imported(folder: Path) -> Diffusion:
    return Diffusion(DiffusersFlow(str(folder)), DiffusersUNet(str(folder)), device="cpu")


# -- the grid ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0, 7.5])
@pytest.mark.parametrize("steps", [1, 2, 20, 50])
def test_the_shifted_grid_is_the_diffusers_grid(tmp_path, shift, steps):
    """The process's default spacing (``shifted``, from ``t_min = S(S(1 / T))``) gives the
    sigmas of ``set_timesteps(N)``, Euler's and Heun's, to float32 rounding; the grids of
    another shift differ by more than 1e-3."""
    for kind in (diffusers.FlowMatchEulerDiscreteScheduler,
                 diffusers.FlowMatchHeunDiscreteScheduler):
        scheduler = kind(shift=shift)
        scheduler.save_pretrained(tmp_path)
        process = DiffusersFlow(str(tmp_path))
        scheduler.set_timesteps(steps)
        theirs = torch.unique_consecutive(scheduler.sigmas.double())  # Heun repeats each
        ours = sampling_times(process, steps, "auto")
        assert len(ours) == len(theirs) == steps + 1
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-7)
    if steps > 2:  # two points are the ends, whatever the shift
        other = sampling_times(Flow(t_min=process.t_min, shift=shift + 1.0), steps, "shifted")
        assert float((other - theirs).abs().max()) > 1e-3


def test_the_shift_lowers_the_log_snr_by_two_log_s():
    """The defining property of SD3's shift on the line: the noise-to-signal ratio
    ``t / (1 - t)`` is multiplied by ``s``, so ``lambda(S(u)) = lambda(u) - 2 log s``
    (autograd-free, against the process's own log-SNR); ``S^-1`` inverts ``S``."""
    line = Flow()
    u = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0, 7.5):
        shifted = shift_time(u, shift)
        torch.testing.assert_close(line.log_snr(shifted), line.log_snr(u) - 2 * math.log(shift))
        torch.testing.assert_close(unshift_time(shifted, shift), u)


def test_the_shifted_spacing_is_uniform_in_the_unshifted_time_and_needs_a_shift():
    process = Flow(shift=3.0, t_min=0.01)
    times = sampling_times(process, 11, "shifted")[:-1]
    u = unshift_time(times, 3.0)
    torch.testing.assert_close(u[:-1] - u[1:], torch.full((10,), (1 - u[-1].item()) / 10,
                                                           dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert times[0] == 1.0 and times[-1] == 0.01
    torch.testing.assert_close(sampling_times(Flow(), 20, "shifted"),
                               sampling_times(Flow(), 20, "uniform"), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="DDPM has none"):
        sampling_times(DDPM(), 20, "shifted")


# -- the process and the network ---------------------------------------------------------------

def test_the_process_is_the_schedulers_line(tmp_path):
    """diffusers' scale_noise is dkit's marginal at t = sigma; the process passes the contract
    checks; pipeline folder, scheduler folder and file read the same."""
    save_flow(tmp_path / "pipe", shift=3.0)
    paths = [tmp_path / "pipe", tmp_path / "pipe" / "scheduler",
             tmp_path / "pipe" / "scheduler" / "scheduler_config.json"]
    process = DiffusersFlow(str(paths[0]))
    assert all(repr(DiffusersFlow(str(p))).split(",")[1:] == repr(process).split(",")[1:]
               for p in paths[1:])
    assert process.shift == 3.0 and process.num_train_timesteps == 1000
    assert process.t_min == pytest.approx(shift_time(shift_time(1e-3, 3.0), 3.0))
    assert process.default_spacing == "shifted" and process.path == "linear"
    check_process(process)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(paths[1])
    x0, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    steps = scheduler.timesteps[[0, 400, 999]]
    theirs = scheduler.scale_noise(x0, steps, eps)
    ours, _ = process.marginal_sample(x0.double(), steps.double() / 1000, eps.double())
    torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=1e-6)


def test_the_velocity_has_diffusers_sign(tmp_path):
    """The exact velocity ``eps - x0`` of ``x_sigma``, fed to diffusers' Euler step, moves
    ``x`` along the line to the next sigma; dkit reads the same output as ``velocity`` and
    recovers ``x0`` and ``eps`` from it."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.save_pretrained(tmp_path)
    process = DiffusersFlow(str(tmp_path))
    scheduler.set_timesteps(10)
    x0, eps = torch.randn(2, 4).double(), torch.randn(2, 4).double()
    for k in range(10):  # in order: step() counts its own index
        sigma, after = scheduler.sigmas[k].double(), scheduler.sigmas[k + 1].double()
        x = (1 - sigma) * x0 + sigma * eps
        output = eps - x0
        moved = scheduler.step(output, scheduler.timesteps[k], x).prev_sample
        torch.testing.assert_close(moved.double(), (1 - after) * x0 + after * eps,
                                   rtol=0, atol=1e-6)
        t = torch.full((2,), float(sigma), dtype=torch.float64)
        torch.testing.assert_close(process.convert(output, x, t, "velocity", "x0"), x0)
        torch.testing.assert_close(process.convert(output, x, t, "velocity", "eps"), eps)


def test_the_network_is_the_unet_at_timestep_sigma_T(tmp_path):
    pipeline = save_flow(tmp_path, shift=3.0, num_train_timesteps=500)
    network = DiffusersUNet(str(tmp_path))
    assert network.prediction == "velocity" and network.num_steps == 500
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(7)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        for step, sigma in zip(scheduler.timesteps, scheduler.sigmas, strict=False):
            t = torch.full((3,), float(sigma))
            assert torch.equal(flow_timestep(t, 500), torch.full((3,), float(step)))
            torch.testing.assert_close(network(x, t), pipeline.unet(x, step).sample,
                                       rtol=0, atol=1e-6)
    explicit = DiffusersUNet(str(tmp_path / "unet"), prediction="velocity",
                             num_train_timesteps=500)
    torch.testing.assert_close(explicit(x, torch.full((3,), 0.3)), network(x, torch.full(
        (3,), 0.3)), rtol=0, atol=0)


@pytest.mark.parametrize(("change", "message"), [
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting is set: the shift then depends on"),
    ({"invert_sigmas": True}, "invert_sigmas is set"),
    ({"num_train_timesteps": 1}, "num_train_timesteps must be an integer of at least 2"),
    ({"shift": -1.0}, r"shift must be a number in \(0, 1000\]"),
    ({"_class_name": "DDIMScheduler"},
     "DDIMScheduler, which is not supported; diffusers_flow reads "
     r"FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler \(DDPM-family"),
])
def test_flow_configs_dkit_cannot_map_are_refused_with_the_reason(tmp_path, change, message):
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path)
    config = tmp_path / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        DiffusersFlow(str(tmp_path))


def test_the_ddpm_process_points_a_flow_config_to_diffusers_flow(tmp_path):
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="read it with process kind diffusers_flow"):
        DiffusersSchedule(str(tmp_path))


# -- sampling parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("shift", SHIFTS)
def test_euler_equals_the_diffusers_flow_match_euler_loop(tmp_path, shift):
    """dkit's Euler and DDIM (the same step on this path), 50 steps on the process's default
    grid, equal diffusers' FlowMatchEulerDiscreteScheduler loop from the same start noise to
    1e-4 max-abs."""
    pipeline = save_flow(tmp_path, shift=shift)
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(50)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = diffusers_loop(pipeline, scheduler, x_T)
    model = imported(tmp_path)
    for solver in (EulerODE(steps=50), DDIM(steps=50, spacing="shifted")):
        ours = model.sample(4, solver, x_T=x_T)
        gap = float((ours.samples - x).abs().max())
        print(f"shift {shift} {type(solver).__name__} 50 max-abs", gap, "of",
              float(x.abs().max()))
        assert ours.nfe == 50 and gap <= 1e-4
    assert 0.5 < float(x.abs().max()) < 20.0
    other = model.sample(4, EulerODE(steps=50, spacing="uniform"), x_T=x_T).samples
    if shift != 1.0:  # the grid matters: the unshifted one lands elsewhere
        assert float((other - x).abs().max()) > 1e-3


# -- specs and commands ------------------------------------------------------------------------

SPEC = """
name: flow
seed: 0
device: cpu
data: {{kind: digits, scale: symmetric}}
process: {{kind: diffusers_flow, path: {folder}}}
network: {{kind: diffusers_unet, path: {folder}}}
objective: {{kind: flow_matching}}
train: {{steps: 0}}
sample:
  n: 6
  solver: {{kind: euler, steps: 10}}
output: {{root: {root}}}
"""


def refused(args: list[str], capsys, message: str) -> None:
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err and message in " ".join(err.split()), err


def test_a_spec_and_dkit_import_sample_the_flow_pipeline(tmp_path, capsys):
    """The spec route and ``dkit import`` draw what the Python API draws from the folder (seed
    0); the import's spec names diffusers_flow, velocity and Euler; ΠGDM restores from pure
    noise on; export is refused with the reason."""
    save_flow(tmp_path / "pipe", shift=3.0)
    spec = tmp_path / "flow.yaml"
    spec.write_text(SPEC.format(folder=tmp_path / "pipe", root=tmp_path / "runs"))
    code, _, err = run_cli(["run", str(spec)], capsys)
    assert code == 0, err
    drawn = np.load(tmp_path / "runs" / "flow" / "latest" / "samples.npz")["samples"]
    expected = imported(tmp_path / "pipe").sample(6, EulerODE(steps=10), seed=0).samples
    torch.testing.assert_close(torch.from_numpy(drawn), expected, rtol=0, atol=1e-5)
    assert float(expected.std()) > 0.05

    run = tmp_path / "imported"
    code, out, err = run_cli(["import", str(tmp_path / "pipe"), "--out", str(run)], capsys)
    assert code == 0, err
    assert "velocity prediction" in out
    written = (run / "spec.yaml").read_text()
    assert "kind: diffusers_flow" in written and "prediction: velocity" in written
    code, _, err = run_cli(["sample", str(run), "--n", "6"], capsys)
    assert code == 0, err
    (sampled,) = (run / "sampling").glob("euler-*/samples.npz")
    expected = imported(tmp_path / "pipe").sample(6, EulerODE(steps=50), seed=0).samples
    torch.testing.assert_close(torch.from_numpy(np.load(sampled)["samples"]), expected,
                               rtol=0, atol=1e-5)
    code, _, err = run_cli(["restore", str(run), "--operator", "{kind: inpaint, mask: box}",
                            "--method", "pigdm", "--n", "2",
                            "--quiet"], capsys)
    assert code == 0, err
    (restored,) = (run / "restoration").glob("pigdm-inpaint-*/restore.npz")
    assert np.isfinite(np.load(restored)["samples"]).all()
    refused(["export", str(run), "--format", "diffusers", str(tmp_path / "out")], capsys,
            "a discrete DDPM chain (ddpm or diffusers_scheduler), the chain of diffusers' "
            "DDPM-family schedulers; this one's is DiffusersFlow")


def _ddpm(folder: Path) -> None:
    """v prediction: a random eps network on this chain drives the flow 180-fold off scale
    (``tests/test_diffusers_import.py``, GENTLE)."""
    save_pipeline(folder, diffusers.DDIMScheduler(**SHORT, prediction_type="v_prediction"))


def _flow(folder: Path) -> None:
    save_flow(folder, shift=3.0)


@pytest.mark.parametrize("make", [_ddpm, _flow])
def test_dkit_likelihood_on_an_imported_folder(tmp_path, capsys, make):
    """``dkit likelihood`` opens an imported run (weights referenced, not copied) and writes
    finite bits/dim; encode -> decode through the probability flow comes back (the flow's
    integrates its data form up to t = 1, where alpha = 0)."""
    make(tmp_path / "pipe")
    run = tmp_path / "run"
    assert run_cli(["import", str(tmp_path / "pipe"), "--out", str(run)], capsys)[0] == 0
    code, _, err = run_cli(["likelihood", str(run), "--n", "2", "--divergence", "hutchinson",
                            "--rtol", "1e-3", "--atol", "1e-3"], capsys)
    assert code == 0, err
    figures = json.loads((run / "likelihood.json").read_text())
    print(make.__name__, {k: v for k, v in figures.items() if k != "settings"})
    assert figures["nll_n"] == 2 and math.isfinite(figures["nll_bpd"])
    assert figures["nll_bpd"] > 0 and figures["nll_nfe"] > 0
    assert figures["reconstruction_max_abs_error"] < 0.05


# -- the worked example of docs/diffusers.md ---------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "diffusers.md"
EXAMPLE = DOCS.parents[1] / "examples" / "build_diffusers_pipeline.py"


def worked_example() -> tuple[str, list[list[str]]]:
    """The docs' worked-example section and the commands of its ``bash`` blocks, split as a
    shell splits them."""
    text = DOCS.read_text(encoding="utf-8")
    start = text.index("## Worked example")
    section = text[start:text.index("\n## ", start + 1)]
    commands = []
    for block in section.split("```bash\n")[1:]:
        for line in block.split("```")[0].splitlines():
            if line.strip() and not line.startswith("#"):
                commands.append(shlex.split(line))
    return section, commands


def test_the_worked_example_runs_as_written(tmp_path, capsys, monkeypatch):
    """Every command of the docs' worked example, in a fresh folder: the example script builds
    the pipelines, each ``dkit`` command exits 0, and the figures the docs paste (the import
    lines' parameter counts, the SWD of each dkit evaluate) are the ones it produces now."""
    spec = importlib.util.spec_from_file_location("build_diffusers_pipeline", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    section, commands = worked_example()
    assert [c[:2] for c in commands].count(["dkit", "import"]) == 2
    assert {c[1] for c in commands if c[0] == "dkit"} == {"import", "sample", "restore",
                                                            "evaluate", "likelihood"}
    for command in commands:
        if command[0] == "python":
            assert command[1] == "examples/build_diffusers_pipeline.py"
            example.main(command[2:])
            continue
        assert command[0] == "dkit", command
        args = [sorted(glob.glob(a))[-1] if "*" in a else a for a in command[1:]]
        code, out, err = run_cli(args, capsys)
        assert code == 0, (command, err)
        if args[0] == "import":
            count = re.search(r"\(([\d,]+) parameters", out)
            assert count is not None and f"({count[1]} parameters" in section
        if args[0] == "evaluate":
            metrics = Path(args[args.index("--samples") + 1]).parent / "metrics.json"
            swd = json.loads(metrics.read_text())["swd"]
            assert f"│ swd          │ {swd:.4g} " in section, swd
