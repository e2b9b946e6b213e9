"""``dkit import`` and ``dkit export``: diffusers pipeline folders in and out of dkit runs.

Every pipeline is a tiny random ``UNet2DModel`` built and saved here (``tests/
test_diffusers_import.py``'s helpers); diffusers itself is the oracle for what an exported
folder draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

diffusers = pytest.importorskip("diffusers")

from diffusers_kit.diffusion import Diffusion  # noqa: E402
from diffusers_kit.processes.ddpm import DDPM  # noqa: E402
from diffusers_kit.processes.diffusers_scheduler import (  # noqa: E402
    DiffusersSchedule,
    scheduler_betas,
    scheduler_config,
)
from diffusers_kit.solvers import DDIM  # noqa: E402
from tests.helpers import run_cli  # noqa: E402
from tests.test_diffusers_import import (  # noqa: E402
    GENTLE,
    SHORT,
    SPEC,
    diffusers_loop,
    save_pipeline,
)

SOLVER = "{kind: ddim, steps: 10, clip_x0: 1.0}"


def samples_of(run: Path, capsys, *extra: str) -> np.ndarray:
    """The samples ``dkit sample RUN`` draws (seed 0) with :data:`SOLVER`."""
    code, _, err = run_cli(["sample", str(run), "--solver", SOLVER, "--n", "6", *extra], capsys)
    assert code == 0, err
    (drawn,) = sorted((run / "sampling").glob("ddim-*/samples.npz"))[-1:]
    return np.load(drawn)["samples"]


def spec_run(tmp_path: Path, pipeline: Path, capsys, name: str = "spec", **changes: str
             ) -> Path:
    """A run of the spec route (``network: {kind: diffusers_unet, path: ...}``)."""
    text = SPEC.format(folder=pipeline, root=tmp_path / "runs").replace(
        "name: imported", f"name: {name}")
    for old, new in changes.items():
        text = text.replace(old, new)
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(text)
    code, _, err = run_cli(["run", str(spec)], capsys)
    assert code == 0, err
    return tmp_path / "runs" / name / "latest"


def refused(args: list[str], capsys, message: str) -> str:
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err and message in " ".join(err.split()), err
    return err


# -- import ------------------------------------------------------------------------------------

def test_import_samples_as_the_spec_route_and_restores(tmp_path, capsys):
    """``dkit import`` -> ``dkit sample`` draws what the spec route draws from the same folder,
    sample for sample; the run holds no copy of the weights; restore and evaluate run."""
    save_pipeline(tmp_path / "pipe", diffusers.DDIMScheduler(**SHORT))
    code, out, err = run_cli(["import", str(tmp_path / "pipe"), "--out",
                              str(tmp_path / "imported")], capsys)
    assert code == 0, err
    assert "holds no copy of the weights" in " ".join(out.split())
    run = tmp_path / "imported"
    spec = (run / "spec.yaml").read_text()
    assert f"path: {tmp_path / 'pipe'}" in spec and "sha256:" in spec
    with safe_open(run / "checkpoint.safetensors", "pt") as checkpoint:
        assert list(checkpoint.keys()) == []  # the U-Net's weights stay in the pipeline folder
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["imported"]["source"] == str(
        tmp_path / "pipe")
    ours = samples_of(run, capsys)
    theirs = samples_of(spec_run(tmp_path, tmp_path / "pipe", capsys), capsys)
    assert np.array_equal(ours, theirs)
    assert ours.std() > 0.05
    code, _, err = run_cli(["restore", str(run), "--operator", "{kind: inpaint, mask: box}",
                            "--n", "2", "--quiet"], capsys)
    assert code == 0, err
    (restored,) = (run / "restoration").glob("pigdm-inpaint-*/restore.npz")
    assert np.isfinite(np.load(restored)["samples"]).all()
    (drawn,) = (run / "sampling").glob("ddim-*/samples.npz")
    code, _, err = run_cli(["evaluate", str(run), "--samples", str(drawn), "--metrics", "swd",
                            "--quiet"], capsys)
    assert code == 0, err


def test_a_changed_source_is_refused(tmp_path, capsys):
    """The run's spec records the SHA-256 and size of the files it references: another U-Net
    of the same size, a byte changed in place, a changed scheduler: exit 2, saying so."""
    save_pipeline(tmp_path / "pipe", diffusers.DDIMScheduler(**SHORT))
    assert run_cli(["import", str(tmp_path / "pipe"), "--name", "pipe", "--out",
                    str(tmp_path / "run")], capsys)[0] == 0
    run = str(tmp_path / "run")
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 1  # the last byte of the last tensor: same size, other contents
    weights.write_bytes(bytes(changed))
    refused(["sample", run, "--n", "2"], capsys, "changed since they were imported: SHA-256")
    weights.write_bytes(original + b" ")
    refused(["sample", run, "--n", "2"], capsys, "changed since they were imported: "
            f"{len(original) + 1 + len((weights.parent / 'config.json').read_bytes())} bytes")
    weights.write_bytes(original)
    assert samples_of(Path(run), capsys).shape == (6, 1, 8, 8)
    config = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"beta_end": 0.4', '"beta_end": 0.3'))
    refused(["sample", run, "--n", "2"], capsys, "diffusers_scheduler")


def _pickled(folder: Path) -> None:
    save_pipeline(folder, diffusers.DDIMScheduler(), safe_serialization=False)


def _no_scheduler(folder: Path) -> None:
    save_pipeline(folder, diffusers.DDIMScheduler())
    index = json.loads((folder / "model_index.json").read_text())
    del index["scheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _unet_deleted(folder: Path) -> None:
    save_pipeline(folder, diffusers.DDIMScheduler())
    for file in (folder / "unet").iterdir():
        file.unlink()


def _conditional(folder: Path) -> None:
    save_pipeline(folder, diffusers.DDIMScheduler())
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "_class_name": "UNet2DConditionModel"}))


def _vae(folder: Path) -> None:
    save_pipeline(folder, diffusers.DDIMScheduler())
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(
        {**index, "vqvae": ["diffusers", "VQModel"]}))


def _dynamic_flow(folder: Path) -> None:
    """A flow-matching scheduler imports (tests/test_diffusers_flow.py), but not one whose shift
    the pipeline sets per resolution."""
    save_pipeline(folder, diffusers.DDIMScheduler())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}))


def _zero_snr(folder: Path) -> None:
    save_pipeline(folder, diffusers.DDIMScheduler(rescale_betas_zero_snr=True))


def _sigmoid(folder: Path) -> None:
    save_pipeline(folder, diffusers.DDIMScheduler())
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "beta_schedule": "sigmoid"}))


def _component(folder: Path) -> None:
    save_pipeline(folder.parent / "whole", diffusers.DDIMScheduler())
    (folder.parent / "whole" / "unet").rename(folder)


@pytest.mark.parametrize(("make", "message"), [
    (_component, "a component folder (import the pipeline folder above it)"),
    (_zero_snr, "rescale_betas_zero_snr is set"),
    (_sigmoid, "beta_schedule 'sigmoid' is not supported"),
    (lambda f: f.mkdir(), "it has no model_index.json: not a pipeline"),
    (lambda f: None, "it does not exist"),
    (_no_scheduler, "its model_index.json lists no scheduler (it lists unet)"),
    (_unet_deleted, "the unet component is missing"),
    (_conditional, "its model_index.json lists no text_encoder (it lists scheduler, unet)"),
    (_vae, "the vqvae component is missing: model_index.json lists it"),
    (_dynamic_flow, "use_dynamic_shifting is set: the shift then depends on each image's "
                    "resolution"),
    (_pickled, "only pickle weights (diffusion_pytorch_model.bin); dkit reads safetensors "
               "only, since unpickling a file can run code"),
])
def test_import_refusals_say_why(tmp_path, capsys, monkeypatch, make, message):
    monkeypatch.chdir(tmp_path)
    make(tmp_path / "pipe")
    refused(["import", "pipe"], capsys, message)
    assert not (tmp_path / "runs").exists()


def test_import_refuses_an_out_folder_that_holds_something(tmp_path, capsys):
    save_pipeline(tmp_path / "pipe", diffusers.DDIMScheduler())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    refused(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "full")], capsys,
            "--out: expected a run folder that does not exist yet, or an empty folder")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_a_unet_of_other_images_needs_data(tmp_path, capsys):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                                                                         "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4)
    save_pipeline(tmp_path / "pipe", diffusers.DDIMScheduler(**SHORT), unet=unet)
    refused(["import", str(tmp_path / "pipe")], capsys,
            "--data: expected a data set of the U-Net's 3-channel images")
    images = np.random.default_rng(0).random((20, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "images.npz", x=images)
    data = f"{{kind: npz, path: {tmp_path / 'images.npz'}}}"
    code, _, err = run_cli(["import", str(tmp_path / "pipe"), "--data", data, "--out",
                            str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert samples_of(tmp_path / "run", capsys).shape == (6, 3, 8, 8)


# -- export ------------------------------------------------------------------------------------

@pytest.mark.parametrize("process", [
    DDPM(), DDPM(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    DDPM(schedule="cosine"), DDPM(num_steps=20, beta_start=0.002, beta_end=0.4),
    DDPM(schedule="cosine", cosine_offset=0.02), DDPM(betas=[1e-3, 0.02, 0.3, 0.123456789]),
])
def test_the_scheduler_config_carries_the_chain_exactly(process):
    """dkit reads back the same float64 betas bit for bit (named schedule or trained_betas),
    and diffusers builds the same alphas_cumprod to float32 rounding."""
    config = scheduler_config(process, "v_prediction")
    betas, _ = scheduler_betas(json.loads(json.dumps(config)), "written")
    assert torch.equal(betas, process.betas)
    theirs = diffusers.DDPMScheduler(**config)
    torch.testing.assert_close(theirs.alphas_cumprod.double(), process.alphas_cumprod,
                               rtol=2e-5, atol=1e-6)
    named = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    offset = process._settings.get("cosine_offset", 0.008)
    expected = named.get(process.schedule) if offset == 0.008 else None
    assert config.get("beta_schedule") == expected
    assert (config.get("trained_betas") is None) == (expected is not None)


def test_export_reproduces_the_run_in_diffusers_ddim(tmp_path, capsys):
    """A fine-tuned run (EMA weights differ from the trained ones) exported, loaded with
    DDIMPipeline: diffusers' DDIM, 20 steps from the same start noise, equals dkit's DDIM
    (20 steps on this T = 20 chain: see docs/diffusers.md, Grids) to 1e-4 max-abs; DDPMPipeline
    loads the same folder; importing the export samples as the run does."""
    chain = {**SHORT, "num_train_timesteps": 20}
    save_pipeline(tmp_path / "pipe", diffusers.DDIMScheduler(**chain,
                                                             prediction_type="v_prediction"))
    run = spec_run(tmp_path, tmp_path / "pipe", capsys, name="tuned", **{
        "train: {steps: 0}": "train: {steps: 3, batch_size: 16, ema_decay: 0.5}"})
    out = tmp_path / "exported"
    code, _, err = run_cli(["export", str(run), "--format", "diffusers", str(out)], capsys)
    assert code == 0, err
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipeline = diffusers.DDIMPipeline.from_pretrained(out)
    scheduler = pipeline.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(20)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    x = diffusers_loop(pipeline, scheduler, x_T, eta=0.0)
    model = Diffusion.from_run(run)
    ours = model.sample(4, DDIM(steps=20, eta=0.0), x_T=x_T).samples
    with capsys.disabled():
        print("export DDIM 20 max-abs", float((ours - x).abs().max()), "of",
              float(x.abs().max()))
    assert float((ours - x).abs().max()) <= 1e-4
    assert 0.5 < float(x.abs().max()) < 20.0
    source = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    tuned = pipeline.unet.state_dict()
    assert any(not torch.equal(v, tuned[k]) for k, v in source.state_dict().items())
    ddpm = diffusers.DDPMPipeline.from_pretrained(out)
    torch.testing.assert_close(ddpm.scheduler.alphas_cumprod.double(),
                               DiffusersSchedule(str(tmp_path / "pipe")).alphas_cumprod,
                               rtol=2e-5, atol=1e-6)
    images = ddpm(batch_size=2, num_inference_steps=20, generator=torch.Generator()
                  .manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    code, _, err = run_cli(["import", str(out), "--out", str(tmp_path / "back")], capsys)
    assert code == 0, err
    assert np.array_equal(samples_of(tmp_path / "back", capsys), samples_of(run, capsys))


def test_an_imported_eps_run_exports_with_its_schedule(tmp_path, capsys):
    """The round trip of an imported pipeline: the same chain (trained_betas exactly), the
    same weights, diffusers' DDIM equal to dkit's."""
    betas = torch.linspace(1e-3, 0.05, 20).tolist()
    chain = {**GENTLE, "num_train_timesteps": 20, "trained_betas": betas}
    save_pipeline(tmp_path / "pipe", diffusers.DDIMScheduler(**chain, clip_sample=False))
    assert run_cli(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "run")],
                   capsys)[0] == 0
    out = tmp_path / "exported"
    assert run_cli(["export", str(tmp_path / "run"), "--format", "diffusers", str(out)],
                   capsys)[0] == 0
    written = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert written["trained_betas"] == betas and written["prediction_type"] == "epsilon"
    pipeline = diffusers.DDIMPipeline.from_pretrained(out)
    source = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    assert all(torch.equal(v, pipeline.unet.state_dict()[k])
               for k, v in source.state_dict().items())
    pipeline.scheduler.set_timesteps(20)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    x = x_T.clone()
    with torch.no_grad():
        for step in pipeline.scheduler.timesteps:
            x = pipeline.scheduler.step(pipeline.unet(x, step).sample, step, x).prev_sample
    ours = Diffusion.from_run(tmp_path / "run").sample(3, DDIM(steps=20), x_T=x_T).samples
    with capsys.disabled():
        print("imported eps DDIM 20 max-abs", float((ours - x).abs().max()), "of",
              float(x.abs().max()))
    assert 0.5 < float(x.abs().max()) < 20.0
    assert float((ours - x).abs().max()) <= 1e-4


OWN = """
name: own
device: cpu
data: {{kind: digits, scale: symmetric}}
process: {{kind: ddpm, num_steps: {steps}}}
network: {{kind: unet, channels: 8, channel_mult: [1, 2], res_blocks: 1,
          attention_resolutions: [4], norm_groups: 4, prediction: v}}
objective: {{kind: ddpm_simple}}
train: {{steps: 3, batch_size: 16, ema_decay: 0.5}}
output: {{root: {root}}}
"""


def own_unet_run(tmp_path: Path, capsys, steps: int) -> Path:
    spec = tmp_path / "own.yaml"
    spec.write_text(OWN.format(steps=steps, root=tmp_path / "runs"))
    code, _, err = run_cli(["run", str(spec)], capsys)
    assert code == 0, err
    return tmp_path / "runs" / "own" / "latest"


def test_random_dkit_unets_map_onto_unet2d_at_every_step():
    """dkit's unet at t = i / 1000 is the mapped UNet2DModel at timestep i - 1, for every step
    i (the time layer rotated; module doc of interop.unet2d); without the rotation it is not."""
    from diffusers_kit.interop.unet2d import unet2d_config, unet2d_refusal, unet2d_state
    from diffusers_kit.networks.unet import UNet

    for options in ({"channels": 8, "channel_mult": [1, 2], "res_blocks": 1,
                     "attention_resolutions": [4], "norm_groups": 4},
                    {"channels": 8, "channel_mult": [1, 1, 1], "res_blocks": 2, "heads": 2,
                     "attention_resolutions": [8, 2], "norm_groups": 4}):
        torch.manual_seed(0)
        network = UNet(data_shape=(1, 8, 8), **options).eval()
        with torch.no_grad():  # the zero-initialised layers too
            for parameter in network.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        assert unet2d_refusal(network, 1000) is None
        unet = diffusers.UNet2DModel(**unet2d_config(network)).eval()
        unet.load_state_dict(unet2d_state(network), strict=True)
        steps = torch.arange(1, 1001)
        x = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = network(x, (steps.double() / 1000).float())
            gap = float((ours - unet(x, steps - 1).sample).abs().max())
            unshifted = float((ours - unet(x, steps).sample).abs().max())
        print("unet -> UNet2DModel max-abs", gap, "of", float(ours.abs().max()))
        assert gap <= 2e-5 < 1e-3 < unshifted


@pytest.mark.parametrize(("options", "message"), [
    ({"channel_mult": [2, 2]}, "channel_mult starting at 1; here conv_in has 8 channels"),
    ({"heads": 2, "attention_resolutions": [8, 4]},
     "attention heads of one width in every attention block"),
    ({"num_classes": 3}, "an unconditional U-Net"),
    ({"learned_variance": True}, "a U-Net without learned variances"),
])
def test_dkit_unets_without_a_counterpart_are_refused(options, message):
    from diffusers_kit.interop.unet2d import unet2d_refusal
    from diffusers_kit.networks.unet import UNet

    settings = {"channels": 8, "channel_mult": [1, 2], "res_blocks": 1,
                "attention_resolutions": [4], "norm_groups": 4, **options}
    network = UNet(data_shape=(1, 8, 8), **settings)
    assert message in unet2d_refusal(network, 1000)
    assert "a chain of T = 1000 steps" in unet2d_refusal(network, 999)


def test_a_dkit_unet_run_exports_and_diffusers_samples_it(tmp_path, capsys):
    """A trained dkit unet (v, T = 1000, EMA) exported: diffusers' DPM-Solver++(2M) on dkit's
    20-step grid (custom timesteps, as in test_diffusers_import) equals dkit's to 1e-4."""
    from diffusers_kit.solvers import DPMSolver2M
    from diffusers_kit.solvers.grids import sampling_times

    run = own_unet_run(tmp_path, capsys, 1000)
    out = tmp_path / "exported"
    code, _, err = run_cli(["export", str(run), "--format", "diffusers", str(out)], capsys)
    assert code == 0, err
    pipeline = diffusers.DDPMPipeline.from_pretrained(out)
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        pipeline.scheduler.config, algorithm_type="dpmsolver++", solver_order=2,
        final_sigmas_type="zero", lower_order_final=True)
    model = Diffusion.from_run(run)
    times = sampling_times(model.process, 20, "uniform")[:-1]
    scheduler.set_timesteps(timesteps=(torch.round(times * 1000).long() - 1).tolist())
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    x = diffusers_loop(pipeline, scheduler, x_T)
    ours = model.sample(4, DPMSolver2M(steps=20, spacing="uniform"), x_T=x_T).samples
    with capsys.disabled():
        print("unet export DPM-Solver++(2M) 20 max-abs", float((ours - x).abs().max()), "of",
              float(x.abs().max()))
    assert float((ours - x).abs().max()) <= 1e-4
    assert 0.5 < float(x.abs().max()) < 20.0


def test_export_refusals(tmp_path, capsys):
    """dkit's unet on a chain of T != 1000 is refused with the reason; OUT must be absent or
    empty; nothing is written on a refusal."""
    run = str(own_unet_run(tmp_path, capsys, 20))
    refused(["export", run, "--format", "diffusers", str(tmp_path / "out")], capsys,
            "a chain of T = 1000 steps for dkit's own U-Net (network kind 'unet')")
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    refused(["export", run, "--format", "diffusers", str(tmp_path / "full")], capsys,
            "OUT: expected a folder that does not exist yet, or an empty one")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    refused(["export", run, "--format", "onnx", str(tmp_path / "out")], capsys,
            "invalid choice: 'onnx'")


def test_a_referenced_unet_takes_its_weights_from_the_verified_file(tmp_path):
    """With sha256, a state dict without any U-Net tensor leaves the file's weights; one
    lacking only some is refused as before; a full one (fine-tuned) loads."""
    from diffusers_kit.interop.diffusers_folder import fingerprint, weight_files
    from diffusers_kit.networks.diffusers_unet import DiffusersUNet

    save_pipeline(tmp_path, diffusers.DDIMScheduler())
    files = [tmp_path / "unet" / "config.json", *weight_files(tmp_path / "unet")]
    sha256, size = fingerprint(files)
    network = DiffusersUNet(str(tmp_path), sha256=sha256, size=size)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    network.load_state_dict({})
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in before.items())
    partial = dict(before)
    partial.pop("unet.conv_in.weight")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*unet\.conv_in\.weight"):
        network.load_state_dict(partial)
    changed = {k: v + 1 for k, v in before.items()}
    network.load_state_dict(changed)
    assert torch.equal(network.state_dict()["unet.conv_in.weight"],
                       changed["unet.conv_in.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        DiffusersUNet(str(tmp_path)).load_state_dict({})  # without sha256: a copy is needed
    with pytest.raises(ValueError, match="size is set without sha256"):
        DiffusersUNet(str(tmp_path), size=size)
