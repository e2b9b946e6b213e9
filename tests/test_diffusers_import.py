"""diffusers pipelines as dkit components, with diffusers itself as the oracle.

Every model here is a tiny random ``UNet2DModel`` the test builds and saves with
``save_pretrained`` into ``tmp_path`` beside its scheduler; nothing is downloaded.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

diffusers = pytest.importorskip("diffusers")

from diffusers_kit.diffusion import Diffusion  # noqa: E402
from diffusers_kit.networks.diffusers_unet import DiffusersUNet, diffusers_timestep  # noqa: E402
from diffusers_kit.processes.ddpm import DDPM  # noqa: E402
from diffusers_kit.processes.diffusers_scheduler import (  # noqa: E402
    SCHEDULERS,
    DiffusersSchedule,
)
from diffusers_kit.solvers import DDIM, DPMSolver2M  # noqa: E402
from diffusers_kit.solvers.grids import sampling_times  # noqa: E402
from diffusers_kit.testing import check_process  # noqa: E402

SCHEDULES = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": torch.linspace(1e-3, 0.05, 200).tolist(),
                      "num_train_timesteps": 200},
}


def tiny_unet(num_class_embeds: int | None = None) -> diffusers.UNet2DModel:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds)


def save_pipeline(folder, scheduler, unet=None, **pipe_kwargs):
    pipeline = diffusers.DDIMPipeline(unet=unet or tiny_unet(), scheduler=scheduler)
    pipeline.save_pretrained(folder, **pipe_kwargs)
    return pipeline


# -- the process -------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_alphas_cumprod_equal_diffusers(tmp_path, name, schedule):
    """dkit's abar_i (float64) is the scheduler's alphas_cumprod[i - 1] (float32) to float32
    rounding; an off-by-one step would differ by beta >= 1e-3 relative."""
    scheduler = getattr(diffusers, name)(**SCHEDULES[schedule])
    scheduler.save_pretrained(tmp_path)
    process = DiffusersSchedule(str(tmp_path))
    theirs = scheduler.alphas_cumprod.double()
    assert process.num_steps == len(theirs)
    torch.testing.assert_close(process.alphas_cumprod, theirs, rtol=2e-5, atol=1e-6)
    steps = torch.arange(1, process.num_steps + 1, dtype=torch.float64) / process.num_steps
    torch.testing.assert_close(process.alpha(steps) ** 2, theirs, rtol=2e-5, atol=1e-6)


def diffusers_loop(pipeline, scheduler, x_T, **step):  # type: ignore[no-untyped-def]
    """diffusers' own sampling loop: ``scheduler.step`` over its ``timesteps`` (set by the
    caller) on the pipeline's U-Net, from ``x_T``; ``step`` goes to each ``scheduler.step``."""
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipeline.unet(x, t).sample, t, x, **step).prev_sample
    return x


def test_dkit_schedules_are_diffusers_schedules():
    """ddpm's scaled_linear and cosine are diffusers' scaled_linear and squaredcos_cap_v2."""
    scaled = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012)
    ours = DDPM(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(ours.betas, scaled.betas.double(), rtol=1e-6, atol=1e-9)
    cosine = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(DDPM(schedule="cosine").betas, cosine.betas.double(),
                               rtol=1e-5, atol=1e-8)


def test_the_process_reads_a_pipeline_its_scheduler_folder_or_the_file(tmp_path):
    save_pipeline(tmp_path / "pipe", diffusers.DDIMScheduler(beta_schedule="scaled_linear"))
    paths = [tmp_path / "pipe", tmp_path / "pipe" / "scheduler",
             tmp_path / "pipe" / "scheduler" / "scheduler_config.json"]
    tables = [DiffusersSchedule(str(p)).alphas_cumprod for p in paths]
    assert all(torch.equal(tables[0], t) for t in tables[1:])
    assert DiffusersSchedule(str(paths[0])).schedule == "scaled_linear"


def test_the_imported_process_passes_the_process_identities(tmp_path):
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012).save_pretrained(tmp_path)
    check_process(DiffusersSchedule(str(tmp_path)))


def test_zero_terminal_snr_is_refused_as_ddpm_refuses_beta_one(tmp_path):
    scheduler = diffusers.DDIMScheduler(rescale_betas_zero_snr=True)
    assert float(scheduler.alphas_cumprod[-1]) == 0.0  # alpha(1) = 0 exactly
    assert float(scheduler.betas[-1]) == 1.0
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        DDPM(betas=scheduler.betas.double().tolist())
    # diffusers' multistep schedulers put 2^-24 in its place (docs/diffusers.md)
    dpm = diffusers.DPMSolverMultistepScheduler(rescale_betas_zero_snr=True)
    assert float(dpm.alphas_cumprod[-1]) == 2.0**-24
    scheduler.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"rescale_betas_zero_snr.*zero terminal SNR"):
        DiffusersSchedule(str(tmp_path))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"},
         "beta_schedule 'sigmoid' is not supported"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "flow-matching scheduler"),
        ({"_class_name": "KarrasVeScheduler"}, "KarrasVeScheduler, which is not supported"),
        ({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]},
         "2 trained_betas for num_train_timesteps 1000"),
    ],
)
def test_unsupported_scheduler_configs_are_named(tmp_path, config, message):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        DiffusersSchedule(str(tmp_path))


# -- the network -------------------------------------------------------------------------------

def test_timestep_of_t_is_the_step_minus_one():
    """dkit step i (t = i / T, here as float32) is diffusers' timestep i - 1, exactly."""
    for steps in (50, 1000, 4096):
        i = torch.arange(1, steps + 1)
        t = (i.double() / steps).float()
        assert torch.equal(diffusers_timestep(t, steps), (i - 1).float())
    half = torch.tensor([10.5 / 50])
    assert float(diffusers_timestep(half, 50)) == pytest.approx(9.5)


@pytest.mark.parametrize(("kind", "ours"),
                         [("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")])
def test_the_network_is_the_unet_at_the_mapped_timestep(tmp_path, kind, ours):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=100, prediction_type=kind)
    pipeline = save_pipeline(tmp_path, scheduler)
    network = DiffusersUNet(str(tmp_path))
    assert network.prediction == ours and network.num_steps == 100
    assert network.data_shape == (1, 8, 8) and network.num_classes is None
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        for step in (1, 37, 100):
            t = torch.full((3,), step / 100)
            theirs = pipeline.unet(x, step - 1).sample
            torch.testing.assert_close(network(x, t), theirs, rtol=0, atol=1e-6)
        between = network(x, torch.full((3,), 0.375))  # timestep 36.5: the embedding there
        torch.testing.assert_close(between, pipeline.unet(x, torch.tensor(36.5)).sample,
                                   rtol=0, atol=1e-6)


def test_the_unet_folder_alone_and_explicit_settings(tmp_path):
    save_pipeline(tmp_path, diffusers.DDIMScheduler(prediction_type="v_prediction"))
    alone = DiffusersUNet(str(tmp_path / "unet"))  # reads ../scheduler
    assert alone.prediction == "v" and alone.num_steps == 1000
    minimal = tmp_path / "scheduler" / "scheduler_config.json"
    minimal.write_text(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 40}))
    defaults = DiffusersUNet(str(tmp_path))  # diffusers' default prediction_type
    assert defaults.prediction == "eps" and defaults.num_steps == 40
    assert DiffusersSchedule(str(tmp_path)).num_steps == 40
    minimal.unlink()
    with pytest.raises(ValueError, match="no scheduler config beside it"):
        DiffusersUNet(str(tmp_path / "unet"))
    explicit = DiffusersUNet(str(tmp_path / "unet"), prediction="eps", num_train_timesteps=50)
    assert explicit.prediction == "eps" and explicit.num_steps == 50


def test_v_is_the_same_velocity_in_both_libraries():
    """diffusers' get_velocity sqrt(abar) eps - sqrt(1 - abar) x0 is dkit's v = alpha eps -
    sigma x0 at the same step, and dkit's conversions invert it."""
    scheduler = diffusers.DDPMScheduler()
    process = DDPM()
    x0, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    timesteps = torch.tensor([0, 10, 500, 999])
    t = (timesteps + 1).double() / 1000
    theirs = scheduler.get_velocity(x0.double(), eps.double(), timesteps)
    x_t, _ = process.marginal_sample(x0.double(), t, eps.double())
    alpha, sigma = (c.reshape(-1, 1, 1, 1) for c in process.marginal(t))
    # diffusers forms sqrt(1 - abar) from float32 abar: ~1e-5 off at timestep 0
    torch.testing.assert_close(alpha * eps.double() - sigma * x0.double(), theirs,
                               rtol=0, atol=2e-5)
    back = process.convert(theirs, x_t, t, "v", "eps")
    torch.testing.assert_close(back, eps.double(), rtol=1e-5, atol=1e-5)


def test_class_labels_reach_the_class_embedding(tmp_path):
    pipeline = save_pipeline(tmp_path, diffusers.DDIMScheduler(), unet=tiny_unet(3))
    network = DiffusersUNet(str(tmp_path))
    assert network.num_classes == 3
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    with torch.no_grad():
        ours = network(x, torch.full((3,), 0.5), y)
        torch.testing.assert_close(ours, pipeline.unet(x, 499, class_labels=y).sample,
                                   rtol=0, atol=1e-6)
        assert (ours - network(x, torch.full((3,), 0.5), y.flip(0))).abs().max() > 1e-3
        with pytest.raises(ValueError, match=r"needs class labels 0..2; it has no null"):
            network(x, torch.full((3,), 0.5))
        with pytest.raises(ValueError, match="no null"):
            network(x, torch.full((3,), 0.5), torch.tensor([0, 3, 1]))


def test_folder_errors_name_the_folder_and_the_problem(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is not a diffusers pipeline folder"):
        DiffusersUNet(str(empty))
    with pytest.raises(ValueError, match="does not exist"):
        DiffusersUNet(str(tmp_path / "nowhere"))
    no_unet = tmp_path / "no_unet"
    diffusers.DDIMScheduler().save_pretrained(no_unet / "scheduler")
    (no_unet / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDIMPipeline", "scheduler": ["diffusers", "DDIMScheduler"]}))
    with pytest.raises(ValueError, match=r"no_unet' has no unet .*lists scheduler"):
        DiffusersUNet(str(no_unet))
    conditional = tmp_path / "conditional"
    conditional.mkdir()
    (conditional / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="attends to a context: set conditioner"):
        DiffusersUNet(str(conditional), prediction="eps", num_train_timesteps=10)
    (conditional / "config.json").write_text(json.dumps(
        {"_class_name": "UNetSpatioTemporalConditionModel"}))
    with pytest.raises(ValueError, match="UNetSpatioTemporalConditionModel, which is not "
                       "supported; diffusers_unet reads UNet2DModel / UNet2DConditionModel"):
        DiffusersUNet(str(conditional), prediction="eps", num_train_timesteps=10)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"out_channels": 2}, "learned variances are not supported"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type 'fourier' is not supported"),
        ({"class_embed_type": "timestep"}, "class_embed_type 'timestep' is not supported"),
        ({"_class_name": "AutoencoderKL"}, "AutoencoderKL, which is not supported"),
    ],
)
def test_unsupported_unet_configs_are_named(tmp_path, change, message):
    save_pipeline(tmp_path, diffusers.DDIMScheduler())
    config = tmp_path / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        DiffusersUNet(str(tmp_path))


def test_weight_variants_alone_are_not_read(tmp_path):
    save_pipeline(tmp_path, diffusers.DDIMScheduler())
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(ValueError, match=r"only diffusion_pytorch_model\.fp16\.safetensors"):
        DiffusersUNet(str(tmp_path))


def test_the_process_needs_no_diffusers_and_the_network_says_how_to_get_it(tmp_path,
                                                                          monkeypatch):
    save_pipeline(tmp_path, diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now fails
    assert DiffusersSchedule(str(tmp_path)).schedule == "cosine"
    with pytest.raises(ValueError, match=r"pip install diffusers_kit\[diffusers\]"):
        DiffusersUNet(str(tmp_path))


def test_pickle_weights_are_never_read(tmp_path):
    save_pipeline(tmp_path, diffusers.DDIMScheduler(), safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match=r"only pickle weights \(diffusion_pytorch_model.bin\)"):
        DiffusersUNet(str(tmp_path))


def test_mismatched_weights_and_data_shapes(tmp_path):
    save_pipeline(tmp_path, diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match=r"takes images of 1 channels .* shape \(3, 8, 8\)"):
        DiffusersUNet(str(tmp_path), data_shape=(3, 8, 8))
    assert DiffusersUNet(str(tmp_path), data_shape=(1, 16, 16)).data_shape == (1, 16, 16)
    config = tmp_path / "unet" / "config.json"
    changed = json.loads(config.read_text())
    changed["block_out_channels"] = [8, 24]
    config.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=r"cannot load the UNet2DModel in .*unet"):
        DiffusersUNet(str(tmp_path))


# -- sampling parity -------------------------------------------------------------------------

#: A 50-step chain that reaches abar_T = 3e-5 (the default betas times 20).
SHORT = {"num_train_timesteps": 50, "beta_start": 0.002, "beta_end": 0.4}
#: A gentler one (abar_T = 0.28) for the random eps network: its eps does not match x_t, so
#: DDIM multiplies x by alpha(0) / alpha(1) over the run (1 / 0.53 here, 180 on SHORT), and
#: a 1e-4 bound only means something on outputs of order one.
GENTLE = {"num_train_timesteps": 50, "beta_start": 1e-3, "beta_end": 0.05}


def imported(folder) -> Diffusion:
    return Diffusion(DiffusersSchedule(str(folder)), DiffusersUNet(str(folder)), device="cpu")


def test_the_uniform_grid_is_the_trailing_one_only_when_every_step_is_taken():
    """dkit's uniform 50-step grid on T = 50 is diffusers' (any spacing); on T = 1000 dkit's
    runs from step 1000 to step 1, diffusers' trailing one from 1000 to 20."""
    for total, same in ((50, True), (1000, False)):
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=total,
                                            timestep_spacing="trailing")
        scheduler.set_timesteps(50)
        times = sampling_times(DDPM(num_steps=total), 50, "uniform")[:-1]
        ours = torch.round(times * total).long() - 1
        assert torch.equal(ours, scheduler.timesteps) == same
    assert ours[-1] == 0 and scheduler.timesteps[-1] == 19


@pytest.mark.parametrize(("kind", "chain"), [("epsilon", GENTLE), ("v_prediction", SHORT),
                                             ("sample", SHORT)])
def test_ddim_50_equals_the_diffusers_ddim_loop(tmp_path, kind, chain):
    scheduler = diffusers.DDIMScheduler(**chain, prediction_type=kind, clip_sample=False,
                                        timestep_spacing="trailing", set_alpha_to_one=True)
    pipeline = save_pipeline(tmp_path, scheduler)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler.set_timesteps(50)
    x = diffusers_loop(pipeline, scheduler, x_T, eta=0.0)
    ours = imported(tmp_path).sample(4, DDIM(steps=50, eta=0.0), x_T=x_T)
    assert ours.nfe == 50
    print(kind, "max-abs", float((ours.samples - x).abs().max()), "of", float(x.abs().max()))
    assert float((ours.samples - x).abs().max()) <= 1e-4
    assert 0.5 < float(x.abs().max()) < 20.0  # outputs of order one


def test_ddim_pipeline_with_clipping_equals_dkit_ddim_with_clip_x0(tmp_path):
    """DDIMPipeline (clip_sample, the clipped x0's eps) = dkit DDIM with clip_x0 = 1,
    compared on the pipeline's own output images."""
    scheduler = diffusers.DDIMScheduler(**SHORT, clip_sample=True)
    pipeline = save_pipeline(tmp_path, scheduler)
    generator = torch.Generator().manual_seed(2)
    images = pipeline(batch_size=4, generator=generator, eta=0.0, num_inference_steps=50,
                      use_clipped_model_output=True, output_type="pt").images
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = imported(tmp_path).sample(4, DDIM(steps=50, clip_x0=1.0), x_T=x_T)
    ours_images = (ours.samples / 2 + 0.5).clamp(0, 1)
    print("clipped max-abs", float((ours_images - images).abs().max()))
    assert float((ours_images - images).abs().max()) <= 1e-4
    assert float(images.std()) > 0.05


@pytest.mark.parametrize(("kind", "chain", "spacing"),
                         [("v_prediction", {}, "uniform"), ("v_prediction", {}, "quadratic"),
                          ("epsilon", {"beta_start": 1e-5, "beta_end": 0.0025}, "uniform")])
def test_dpm_solver_2m_equals_diffusers_on_the_same_timesteps(tmp_path, kind, chain, spacing):
    """DPM-Solver++(2M), 50 steps on T = 1000: diffusers' DPMSolverMultistepScheduler given
    dkit's grid as custom timesteps (its final step onto sigma = 0, first order, as dkit's).
    The random eps network runs on a gentler chain (abar_T = 0.28; see GENTLE)."""
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **chain, prediction_type=kind, algorithm_type="dpmsolver++", solver_order=2,
        final_sigmas_type="zero", lower_order_final=True)
    pipeline = save_pipeline(tmp_path, scheduler)
    process = DiffusersSchedule(str(tmp_path))
    times = sampling_times(process, 50, spacing)[:-1]
    scheduler.set_timesteps(timesteps=(torch.round(times * 1000).long() - 1).tolist())
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x = diffusers_loop(pipeline, scheduler, x_T)
    ours = imported(tmp_path).sample(4, DPMSolver2M(steps=50, spacing=spacing), x_T=x_T)
    assert ours.nfe == len(times) == len(scheduler.timesteps)  # quadratic: 49 distinct steps
    print(kind, spacing, "max-abs", float((ours.samples - x).abs().max()), "of",
          float(x.abs().max()))
    assert float((ours.samples - x).abs().max()) <= 1e-4
    assert 0.5 < float(x.abs().max()) < 20.0


# -- in a spec -------------------------------------------------------------------------------

SPEC = """
name: imported
seed: 0
device: cpu
data: {{kind: digits, scale: symmetric}}
process: {{kind: diffusers_scheduler, path: {folder}}}
network: {{kind: diffusers_unet, path: {folder}}}
objective: {{kind: ddpm_simple}}
train: {{steps: 0}}
sample:
  n: 6
  solver: {{kind: ddim, steps: 10, clip_x0: 1.0}}
output: {{root: {root}}}
"""


def test_a_spec_samples_the_imported_pipeline(tmp_path, capsys):
    """``dkit run`` on a spec naming the folder (no training), then ``dkit sample`` on the run
    with another solver, draw what the Python API draws from the same folder with the same
    seed and solver."""
    from tests.helpers import run_cli

    save_pipeline(tmp_path / "pipe", diffusers.DDIMScheduler(**SHORT))
    spec = tmp_path / "imported.yaml"
    spec.write_text(SPEC.format(folder=tmp_path / "pipe", root=tmp_path / "runs"))
    code, _, err = run_cli(["run", str(spec)], capsys)
    assert code == 0, err
    drawn = torch.from_numpy(np.load(tmp_path / "runs" / "imported" / "latest" /
                                     "samples.npz")["samples"])
    expected = imported(tmp_path / "pipe").sample(6, DDIM(steps=10, clip_x0=1.0), seed=0)
    torch.testing.assert_close(drawn, expected.samples, rtol=0, atol=1e-5)
    assert float(drawn.std()) > 0.05
    with safe_open(tmp_path / "runs" / "imported" / "latest" / "checkpoint.safetensors",
                   "pt") as checkpoint:  # the run keeps its own copy of the weights
        names = set(checkpoint.keys())
    assert "network.unet.conv_in.weight" in names
    run = tmp_path / "runs" / "imported" / "latest"
    code, _, err = run_cli(["sample", str(run), "--solver", "{kind: dpm_solver_2m, steps: 10}",
                            "--n", "4"], capsys)
    assert code == 0, err
    (again,) = (run / "sampling").glob("dpm_solver_2m-*/samples.npz")
    expected = imported(tmp_path / "pipe").sample(4, DPMSolver2M(steps=10), seed=0)
    torch.testing.assert_close(torch.from_numpy(np.load(again)["samples"]), expected.samples,
                               rtol=0, atol=1e-5)
