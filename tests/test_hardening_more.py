"""Issue 14, the last loose ends: --allow-change only with --resume; real bounds on every built-in
data set and network parameter; a real full disk and a real read-only file system (not fakes).

The file-system tests mount a small tmpfs inside new user and mount namespaces
(``unshare -Urm``): no root needed, nothing visible outside the child process, and a genuine
ENOSPC / EROFS from the kernel — which also holds for root, unlike ``chmod``. They are skipped
where the kernel or a container's seccomp policy forbids unprivileged namespaces."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest
from pydantic import Field
from pydantic.fields import FieldInfo

from diffusers_kit.checkpoint import load_checkpoint
from diffusers_kit.registry import BUILTIN_SOURCE, get_registry
from diffusers_kit.spec.strict import _unwrap
from tests.helpers import TINY_SPEC, run_cli, write_spec

REPO = Path(__file__).resolve().parents[1]
CKPT = "checkpoint.safetensors"


def flat(text: str) -> str:
    return " ".join(text.split())


# -- 1. --allow-change without --resume --------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--from", "runs/tiny/latest"]])
def test_allow_change_without_resume_is_a_command_line_error(tmp_path, capsys, extra):
    """--allow-change only loosens --resume's same-spec check; --from refuses no change (it
    lists the differences), so the option would silently do nothing anywhere else."""
    spec = write_spec(tmp_path)
    code, out, err = run_cli(["run", str(spec), "--allow-change", "train.optimizer.lr",
                              "train.optimizer.lr=0.0001", *extra, "--quiet"], capsys)
    message = flat(err)
    assert code == 2, message
    assert "--allow-change" in message and "--resume" in message
    assert "train.optimizer.lr" in message, "the value given is shown"
    assert "Traceback" not in out + err
    assert not (tmp_path / "runs").exists(), "nothing was built or created"


# -- 2. bounds on data sets and networks -------------------------------------------------------
def _bounds(metadata: list[typing.Any]) -> tuple[bool, bool]:
    """(has a lower bound, has an upper bound) from Field metadata."""
    parts = [p for m in metadata for p in (m.metadata if isinstance(m, FieldInfo) else [m])]
    lower = any(getattr(p, "ge", None) is not None or getattr(p, "gt", None) is not None
                for p in parts)
    upper = any(getattr(p, "le", None) is not None or getattr(p, "lt", None) is not None
                for p in parts)
    return lower, upper


def _unbounded(annotation: typing.Any, metadata: list[typing.Any], where: str) -> list[str]:
    kind, inner = _unwrap(annotation)
    metadata = [*metadata, *inner]
    if typing.get_origin(kind) in (list, tuple):
        return [found for arg in typing.get_args(kind) if arg is not Ellipsis
                for found in _unbounded(arg, [], f"{where}[]")]
    if kind in (int, float) and _bounds(metadata) != (True, True):
        return [where]
    return []


@pytest.mark.parametrize("kind", ["data", "network", "process", "solver", "predictor",
                                  "corrector", "objective", "metric", "optimizer", "guidance",
                                  "forward_model", "autoencoder", "conditioner"])
def test_every_built_in_number_has_a_lower_and_an_upper_bound(kind):
    """The signature is the spec schema: what it does not bound, validate accepts."""
    found = []
    for component in get_registry().components(kind):
        if component.source != BUILTIN_SOURCE:
            continue
        for name, info in component.params.model_fields.items():
            if name not in component.nested:
                found += _unbounded(info.annotation, [info, *info.metadata],
                                    f"{component.name}.{name}")
    assert not found, f"parameters without a lower and an upper bound: {found}"


NETWORKS = {
    "ncsn": "{kind: ncsn, channels: 8, blocks: 1}",
    "unet": "{kind: unet, channels: 8, channel_mult: [1, 2], res_blocks: 1}",
    "classifier": "{kind: classifier}",
}
DATA = {
    "digits": "{kind: digits}",
    "patches": "{kind: patches}",
    "folder": "{kind: image_folder, path: photos}",
}


@pytest.mark.parametrize("data,network,override", [
    # bounds that were already there, now proven through dkit validate
    ("digits", "ncsn", "network.channels=100000000"),
    ("patches", "ncsn", "data.count=1000000000000"),
    # bounds added for issue 14: each of these passed validate before
    ("digits", "unet", "network.num_classes=1000000000000"),  # an int64 embedding table
    ("digits", "unet", "network.heads=1000000000000"),
    ("digits", "unet", "network.norm_groups=1000000000000"),
    ("digits", "unet", "network.attention_resolutions=[100000000]"),
    ("digits", "classifier", "network.num_classes=1000000000000"),
    ("digits", "ncsn", "data.heldout_fraction=0.9999"),  # 0 training images: a crash in train
    ("digits", "ncsn", "data.heldout_fraction=0.00001"),  # 0 held-out: a crash in evaluate
    ("digits", "ncsn", "data.split_seed=9223372036854775808"),
    ("folder", "ncsn", "data.limit=1000000000000"),
    ("patches", "ncsn", "data.seed=9223372036854775808"),
])
def test_validate_refuses_unrealistic_data_and_network_values(tmp_path, capsys, data, network,
                                                              override):
    text = (TINY_SPEC.replace("data: {kind: digits}", f"data: {DATA[data]}")
            .replace(f"network: {NETWORKS['ncsn']}", f"network: {NETWORKS[network]}"))
    spec = write_spec(tmp_path, text)
    code, out, err = run_cli(["validate", str(spec), override], capsys)
    message = flat(err)
    field = override.split("=")[0]
    assert code == 2, message
    assert f"command line '{override}' {field}" in message and "expected" in message
    assert "Traceback" not in out + err


TOY = """\
name: toy
seed: 0
device: cpu
data: {kind: gaussian_mixture}
process: {kind: vp}
network: {kind: mlp, width: 16, blocks: 1, embedding: fourier}
objective: {kind: dsm}
train: {steps: 2, batch_size: 16, log_every: 1, optimizer: {kind: adam, lr: 0.001}}
output: {root: {root}}
"""


@pytest.mark.parametrize("override", [
    "data.radius=1e300", "data.std=1e300",  # float32 data of inf: NaN losses
    "data.n_train=1000000000000",
    "network.fourier_scale=1e300",  # inf frequencies: NaN time features
    "network.num_classes=1000000000000",  # an internal error allocating 500 TB
])
def test_validate_refuses_unrealistic_toy_data_and_mlp_values(tmp_path, capsys, override):
    code, out, err = run_cli(["validate", str(write_spec(tmp_path, TOY)), override], capsys)
    message = flat(err)
    assert code == 2 and f"{override.split('=')[0]}: expected" in message, message
    assert "Traceback" not in out + err


def test_values_at_the_bounds_still_validate(tmp_path, capsys):
    code, _, err = run_cli(["validate", str(write_spec(tmp_path, TOY)), "data.radius=1000",
                            "network.fourier_scale=1000", "network.num_classes=100000"], capsys)
    assert code == 0, err


# -- 3. a real full disk and a real read-only file system ----------------------------------------
def _namespaces_can_mount() -> bool:
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as where:
        try:
            probe = subprocess.run(["unshare", "-Urm", "sh", "-c",
                                    'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", where],
                                   capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_can_mount(),
    reason="needs unprivileged user and mount namespaces (unshare -Urm) to mount a small tmpfs")


def in_namespace(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run a sh script as root of its own user and mount namespaces: a tmpfs it mounts is seen
    by it alone and vanishes with it. ``$1``.. are ``args``; ``dkit`` runs this dkit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PY": sys.executable}
    script = 'dkit() { "$PY" -m diffusers_kit.cli.main --threads 1 "$@"; }\n' + script
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pages(size: int) -> int:
    return -(-size // 4096) * 4096


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (6 steps) on the ordinary file system."""
    from diffusers_kit.cli.main import main

    base = tmp_path_factory.mktemp("real_fs")
    spec = write_spec(base)
    assert main(["run", str(spec), "--quiet"]) == 0
    (run_dir,) = [p for p in (base / "runs" / "tiny").iterdir() if not p.is_symlink()]
    return spec, run_dir


@pytest.fixture(scope="module")
def disk_full(finished, tmp_path_factory):
    """Resume the run from a tmpfs that holds it with half a checkpoint to spare: the new
    checkpoint cannot be written. What the folder holds afterwards is copied out."""
    spec, run_dir = finished
    out = tmp_path_factory.mktemp("disk_full")
    (out / "mnt").mkdir()
    used = sum(pages(p.stat().st_size) for p in run_dir.iterdir())
    size = pages(used + (run_dir / CKPT).stat().st_size // 2)
    script = """
set -e
mount -t tmpfs -o size=$1 tmpfs "$2/mnt"
cp -a "$3" "$2/mnt/run"
set +e
dkit run "$4" --resume "$2/mnt/run" train.steps=12 --quiet 2> "$2/err"
echo $? > "$2/status"
cp -a "$2/mnt/run" "$2/after"
"""
    done = in_namespace(script, size, out, run_dir, spec)
    assert (out / "status").exists(), done.stderr
    err = (out / "err").read_text()
    return int((out / "status").read_text()), err, out / "after"


@needs_namespaces
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(finished,
                                                                                disk_full):
    _, run_dir = finished
    status, err, after = disk_full
    assert status != 0 and "No space left on device" in err, err
    assert "Traceback" not in err
    assert digest(after / CKPT) == digest(run_dir / CKPT), "the last checkpoint is intact"
    _, meta = load_checkpoint(after / CKPT)  # its checksum verified
    assert meta["training"]["train_step"] == 6
    assert not list(after.glob(f".{CKPT}.*.tmp")), "the half-written file was removed"


@needs_namespaces
def test_a_full_disk_while_writing_a_checkpoint_is_status_3(disk_full):
    status, err, _ = disk_full
    message = flat(err)
    assert "No space left on device" in message, message
    # safetensors reports the ENOSPC as a SafetensorError: checkpoint.py turns it back into
    # the OSError it is (before, this was an internal error, status 70)
    assert status == 3, message
    assert "free some space" in message


@needs_namespaces
def test_a_read_only_file_system_refuses_a_resume_and_a_new_run(finished, tmp_path):
    """Real EROFS (root included): resuming a run kept on a read-only file system is an
    environment error that touches nothing; a new run under it is a spec error on output.root
    raised before anything is created."""
    spec, run_dir = finished
    (tmp_path / "mnt").mkdir()
    script = """
set -e
mount -t tmpfs tmpfs "$1/mnt"
cp -a "$2" "$1/mnt/run"
mount -o remount,ro "$1/mnt"
set +e
dkit run "$3" --resume "$1/mnt/run" train.steps=12 --quiet 2> "$1/resume.err"
echo $? > "$1/resume.status"
dkit run "$3" output.root="$1/mnt/runs" --quiet 2> "$1/new.err"
echo $? > "$1/new.status"
ls -A "$1/mnt" > "$1/listing"
cp -a "$1/mnt/run" "$1/after"
"""
    done = in_namespace(script, tmp_path, run_dir, spec)
    assert (tmp_path / "new.status").exists(), done.stderr
    resume_err = flat((tmp_path / "resume.err").read_text())
    new_err = flat((tmp_path / "new.err").read_text())
    assert int((tmp_path / "resume.status").read_text()) == 3, resume_err
    assert "Read-only file system" in resume_err and "Traceback" not in resume_err
    assert digest(tmp_path / "after" / CKPT) == digest(run_dir / CKPT)
    assert int((tmp_path / "new.status").read_text()) == 2, new_err
    assert "output.root" in new_err and "not writable" in new_err
    assert "Traceback" not in new_err
    assert (tmp_path / "listing").read_text().split() == ["run"], "nothing was created"


@pytest.mark.parametrize("override", ["sample.solver.steps_per_level=1000000000000",
                                      "sample.solver={kind: ddim, steps: 1000000000000}",
                                      "sample.solver={kind: dpm_solver_2m, steps: 200000}"])
def test_solver_step_counts_are_bounded(tmp_path, capsys, override):
    """A step count that would run for ever is refused by validate, naming the field."""
    code, _, err = run_cli(["validate", str(write_spec(tmp_path)), override], capsys)
    assert code == 2, err
    assert "sample.solver" in err and "less than or equal to 100000" in err, err


def test_a_metric_that_does_not_apply_is_a_spec_error_naming_it(tmp_path, capsys):
    """psnr on 2-D points fails inside the metric (a ValueError): exit 2 naming
    evaluate.metrics[i], before any training (the metric is tried on stand-in samples of the
    run's sizes first), no traceback."""
    spec = TINY_SPEC.replace("data: {kind: digits}", "data: {kind: two_moons}").replace(
        "network: {kind: ncsn, channels: 8, blocks: 1}", "network: {kind: mlp, width: 16}")
    spec = spec.replace("    - {kind: swd, projections: 64}",
                        "    - {kind: swd, projections: 64}\n    - {kind: psnr}")
    code, _, err = run_cli(["run", str(write_spec(tmp_path, spec))], capsys)
    assert code == 2, err
    assert "evaluate.metrics[1]" in err and "psnr" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_a_solver_returning_half_a_batch_is_named():
    """Outputs are checked: a plugin solver returning the wrong shape is named at once (half a
    batch would otherwise be accepted, and the metrics would look better)."""
    import torch

    from diffusers_kit import NCSN, VE, Diffusion
    from diffusers_kit.diffusion import PluginOutputError
    from diffusers_kit.solvers import DDIM

    class Half(DDIM):
        def sample(self, model, shape, **kwargs):  # type: ignore[no-untyped-def]
            result = super().sample(model, shape, **kwargs)
            result.samples = result.samples[: shape[0] // 2]
            return result

    diffusion = Diffusion(VE(), NCSN(channels=8, blocks=1, data_shape=(1, 8, 8)), device="cpu")
    with pytest.raises(PluginOutputError, match=r"Half.sample returned samples of shape"):
        diffusion.sample(4, Half(steps=2))
    assert diffusion.sample(4, DDIM(steps=2)).samples.shape == torch.Size([4, 1, 8, 8])


def test_a_metric_returning_a_tensor_is_named():
    import torch

    from diffusers_kit.diffusion import PluginOutputError
    from diffusers_kit.graph import checked_metric
    from diffusers_kit.metrics.base import Metric

    assert checked_metric("ok", Metric(), {"a": 1.0, "b": 2, "c": None}) == {
        "a": 1.0, "b": 2, "c": None}
    with pytest.raises(PluginOutputError, match=r"'score' is a Tensor"):
        checked_metric("mine", Metric(), {"score": torch.tensor(1.0)})
    with pytest.raises(PluginOutputError, match="returned a list"):
        checked_metric("mine", Metric(), [1.0])


def test_capabilities_name_what_a_process_lacks():
    """A plugin process with only part of the noise ladder is refused by the solver's check,
    which names the missing members (it used to pass and crash mid-run)."""
    import torch

    from diffusers_kit.objectives.ddpm import SimpleLoss
    from diffusers_kit.processes import VP
    from diffusers_kit.solvers import AnnealedLangevin

    class HalfLadder(VP):
        def levels(self, *, device=None):  # type: ignore[no-untyped-def]
            return torch.tensor([1.0, 0.1])

    reason = AnnealedLangevin().check(HalfLadder())
    assert reason is not None and "num_levels, level_times" in reason
    assert VP().lacks(VP.DISCRETE_STEPS) == ["num_steps", "step_index"]
    network = type("N", (), {"prediction": "eps", "learned_variance": False})()
    assert "lacks num_steps" in SimpleLoss().check(VP(), network)


def test_validate_constructs_what_needs_no_data(tmp_path, capsys):
    """A constructor's own check (VE's sigma_max below sigma_min) fails dkit validate, naming
    the section; before, validate said ok and the run failed."""
    spec = write_spec(tmp_path)
    code, _, err = run_cli(["validate", str(spec), "process.sigma_min=9.0"], capsys)
    assert code == 2 and "process" in err and "sigma" in err, err
    code, out, _ = run_cli(["validate", str(spec)], capsys)
    assert code == 0 and "is valid" in out


def test_plugins_show_spells_out_literal_and_optional(capsys):
    code, out, _ = run_cli(["plugins", "show", "solver", "ddim"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    assert "one of 'auto'" in flat and "float or none" in flat and "> 0" in flat


def test_a_default_that_violates_its_own_constraint_is_refused_at_registration():
    from diffusers_kit.metrics.base import Metric
    from diffusers_kit.registry import Registry

    class Bad(Metric):
        def __init__(self, k: typing.Annotated[int, Field(ge=1)] = 0) -> None:
            self.k = k

    registry = Registry()
    registry.add_kind("metric", Metric)
    with pytest.raises(TypeError, match=r"default of 'k', 0, violates its own constraint"):
        registry.add("metric", "bad", Bad)
