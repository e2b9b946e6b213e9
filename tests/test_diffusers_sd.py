"""Text-conditioned latent diffusers pipelines (Stable Diffusion's layout) as dkit models, with
diffusers itself as the oracle.

Every pipeline here is a tiny random one the test builds: a ``UNet2DConditionModel``, an
``AutoencoderKL`` (or a ``VQModel``), a ``CLIPTextModel`` and a word-level tokenizer built from a
local vocabulary (``tests.helpers.word_tokenizer``), saved with ``save_pretrained``; nothing is
downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers_kit.autoencoders.diffusers_vae import DiffusersVAE  # noqa: E402
from diffusers_kit.conditioners.diffusers_text import DiffusersText  # noqa: E402
from diffusers_kit.diffusion import Diffusion  # noqa: E402
from diffusers_kit.guidance import ClassifierFree  # noqa: E402
from diffusers_kit.networks.diffusers_unet import DiffusersUNet  # noqa: E402
from diffusers_kit.processes.diffusers_scheduler import DiffusersSchedule  # noqa: E402
from diffusers_kit.solvers import DDIM  # noqa: E402
from tests.helpers import run_cli, word_tokenizer  # noqa: E402
from tests.test_diffusers_commands import refused  # noqa: E402

WORDS = ["a", "photo", "of", "dog", "cat", "blurry", "drawing"]
PROMPTS = ["a photo of a dog", "a drawing of a cat"]
NEGATIVE = "blurry drawing"
#: the chain: T = 20 with 20 DDIM steps, where diffusers' trailing grid is dkit's uniform one
STEPS = 20


def tiny_sd(folder, num_class_embeds: int | None = None, vae: str = "kl",  # type: ignore[no-untyped-def]
            scheduler=None):
    """A tiny random Stable Diffusion pipeline (1-channel 16 x 16 images, 4 x 8 x 8 latents,
    a 12-wide CLIP text encoder with 8 tokens, by default a DDIM scheduler set as dkit's grid
    is), saved to ``folder``."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
        num_class_embeds=num_class_embeds)
    shared = {"in_channels": 1, "out_channels": 1, "block_out_channels": (8, 16),
              "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 4,
              "sample_size": 16}
    if vae == "kl":
        autoencoder = diffusers.AutoencoderKL(latent_channels=4, scaling_factor=0.5, **shared)
    else:
        autoencoder = diffusers.VQModel(latent_channels=4, num_vq_embeddings=32,
                                        scaling_factor=0.75, **shared)
    config = transformers.CLIPTextConfig(
        vocab_size=4 + len(WORDS), hidden_size=12, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=8, pad_token_id=0, bos_token_id=2,
        eos_token_id=3)
    encoder = transformers.CLIPTextModel(config)
    tokenizer = word_tokenizer(WORDS)
    tokenizer.model_max_length = 8
    scheduler = scheduler or diffusers.DDIMScheduler(
        num_train_timesteps=STEPS, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True,
        steps_offset=0)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=autoencoder, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return pipeline


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("sd")
    tiny_sd(folder)
    return folder


def text_model(folder, negative: str = NEGATIVE, latent: bool = False  # type: ignore[no-untyped-def]
               ) -> Diffusion:
    conditioner = DiffusersText(str(folder), prompts=PROMPTS, negative_prompt=negative)
    network = DiffusersUNet(str(folder), conditioner=conditioner)
    autoencoder = DiffusersVAE(str(folder), data_shape=(1, 16, 16)) if latent else None
    return Diffusion(DiffusersSchedule(str(folder)), network, device="cpu",
                     autoencoder=autoencoder)


def their_latents(pipeline, labels: list[int], negative: str, x_T):  # type: ignore[no-untyped-def]
    """StableDiffusionPipeline's latents (``output_type="latent"``) for the prompts ``labels``
    pick, with classifier-free guidance 7.5 and ``STEPS`` DDIM steps from the latents ``x_T``."""
    with torch.no_grad():
        return pipeline([PROMPTS[i] for i in labels], negative_prompt=[negative] * len(labels),
                        height=16, width=16, num_inference_steps=STEPS, guidance_scale=7.5,
                        eta=0.0, latents=x_T.clone(), output_type="latent").images


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_guided_ddim_equals_the_stable_diffusion_pipeline(sd_folder, negative):
    """dkit's DDIM (20 steps on T = 20) with classifier-free guidance 7.5 equals
    StableDiffusionPipeline's latents (output_type="latent") from the same start latents, with
    a negative prompt and with the empty one."""
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = [0, 1, 0, 1]
    theirs = their_latents(pipeline, labels, negative, x_T)
    ours = text_model(sd_folder, negative, latent=True).sample(
        4, DDIM(steps=STEPS, eta=0.0), x_T=x_T, labels=torch.tensor(labels),
        guidance=[ClassifierFree(scale=7.5)])
    assert ours.nfe == STEPS  # one call on the doubled batch per step
    difference = float((ours.latents - theirs).abs().max())
    with torch.no_grad():  # the images: the pipeline's decode of latents / scaling_factor
        images = pipeline.vae.decode(theirs / pipeline.vae.config.scaling_factor).sample
    assert float((ours.samples - images).abs().max()) <= 1e-4
    print(f"negative {negative!r}: max-abs {difference:.2g} of {float(theirs.abs().max()):.3g}")
    assert difference <= 1e-3
    assert 0.5 < float(theirs.abs().max()) < 50.0
    unguided = text_model(sd_folder, negative).sample(
        4, DDIM(steps=STEPS, eta=0.0), x_T=x_T, labels=torch.tensor(labels))
    assert float((unguided.samples - theirs).abs().max()) > 1e-2  # the guidance matters


def test_a_pndm_folder_equals_diffusers_after_the_swap_to_ddim(tmp_path):
    """Stable Diffusion folders ship a PNDMScheduler (leading, steps_offset 1, no alpha one);
    dkit reads its chain, and its DDIM equals the pipeline once diffusers' scheduler is swapped
    to a DDIMScheduler with dkit's grid and final step (trailing, set_alpha_to_one)."""
    pndm = diffusers.PNDMScheduler(num_train_timesteps=STEPS, beta_schedule="scaled_linear",
                                   beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                   skip_prk_steps=True, set_alpha_to_one=False)
    pipeline = tiny_sd(tmp_path, scheduler=pndm)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = diffusers.DDIMScheduler.from_config(
        pipeline.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
        clip_sample=False)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    theirs = their_latents(pipeline, [0, 1], NEGATIVE, x_T)
    ours = text_model(tmp_path).sample(2, DDIM(steps=STEPS), x_T=x_T,
                                       labels=torch.tensor([0, 1]),
                                       guidance=[ClassifierFree(scale=7.5)])
    difference = float((ours.samples - theirs).abs().max())
    print(f"PNDM folder, DDIM: max-abs {difference:.2g} of {float(theirs.abs().max()):.3g}")
    assert difference <= 1e-3


def test_the_contexts_are_the_pipelines_prompt_embeddings(sd_folder):
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    conditioner = DiffusersText(str(sd_folder), prompts=PROMPTS, negative_prompt=NEGATIVE)
    with torch.no_grad():
        cond, uncond = pipeline.encode_prompt(PROMPTS, "cpu", 1, True, [NEGATIVE] * 2)
    assert conditioner.tokens == 8 and conditioner.dim == 12 and conditioner.num_classes == 2
    torch.testing.assert_close(conditioner(torch.tensor([0, 1]), 2, torch.device("cpu")), cond)
    torch.testing.assert_close(conditioner(None, 2, torch.device("cpu")), uncond)
    assert not any("contexts" in key for key in conditioner.state_dict())


def test_class_labels_reach_the_class_embedding_and_pick_the_prompt(tmp_path):
    """With num_class_embeds the label is the class label and picks the prompt; such a U-Net
    has no null class, so classifier-free guidance is refused."""
    pipeline = tiny_sd(tmp_path, num_class_embeds=2)
    model = text_model(tmp_path)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 0])
    with torch.no_grad():
        context, _ = pipeline.encode_prompt([PROMPTS[1], PROMPTS[0]], "cpu", 1, False)
        theirs = pipeline.unet(x, torch.tensor([6, 6]), encoder_hidden_states=context,
                               class_labels=y).sample
        ours = model.network(x, torch.full((2,), 7 / STEPS), y)
    torch.testing.assert_close(ours, theirs)
    assert "class_dropout > 0" in ClassifierFree(scale=3.0).check(model.model)
    with pytest.raises(ValueError, match=r"needs class labels 0\.\.1"):
        model.network(x, torch.full((2,), 0.5))


def test_conditioner_errors_name_the_problem(sd_folder, tmp_path):
    plain = tmp_path / "plain"
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                          block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                          down_block_types=("DownBlock2D",) * 2,
                          up_block_types=("UpBlock2D",) * 2).save_pretrained(plain)
    with pytest.raises(ValueError, match="attends to no context; leave conditioner out"):
        DiffusersUNet(str(plain), prediction="eps", num_train_timesteps=20,
                      conditioner=DiffusersText(str(sd_folder), prompts=PROMPTS))
    narrow = DiffusersText(str(sd_folder), prompts=PROMPTS)
    narrow.dim = 10
    with pytest.raises(ValueError, match=r"context of width 12 \(cross_attention_dim\); its "
                       "conditioner gives width 10"):
        DiffusersUNet(str(sd_folder), conditioner=narrow)
    with pytest.raises(ValueError, match="is not a diffusers pipeline folder"):
        DiffusersText(str(sd_folder / "unet"), prompts=PROMPTS)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text('{"unet": ["diffusers", "X"], '
                                                     '"tokenizer": [null, null]}')
    with pytest.raises(ValueError, match=r"has no text_encoder .*lists unet"):
        DiffusersText(str(tmp_path / "p"), prompts=PROMPTS)


# -- the first stage ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_the_vae_encodes_and_decodes_as_diffusers_with_its_scale_applied_once(tmp_path, kind):
    """encode = scaling_factor (h - shift_factor) with h diffusers' posterior mean (KL) or
    pre-quantisation latent (VQ), a posterior draw with a generator equal to diffusers' own,
    and decode = diffusers' decode of z / scaling_factor + shift_factor."""
    pipeline = tiny_sd(tmp_path, vae=kind)
    vae = pipeline.vae
    if kind == "kl":  # a shift too (FLUX's VAE has one): applied once, inside the scale
        config = tmp_path / "vae" / "config.json"
        config.write_text(config.read_text().replace('"shift_factor": null',
                                                     '"shift_factor": 0.25'))
    ours = DiffusersVAE(str(tmp_path), data_shape=(1, 16, 16))
    lam, shift = (0.5, 0.25) if kind == "kl" else (0.75, 0.0)
    assert float(ours.scale) == lam and ours.latent_shape == (4, 8, 8)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        if kind == "kl":
            h = vae.encode(x).latent_dist.mean
            drawn = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(4))
            torch.testing.assert_close(ours.encode(x, torch.Generator().manual_seed(4)),
                                       lam * (drawn - shift))
        else:
            h = vae.encode(x).latents
        z = ours.encode(x)
        torch.testing.assert_close(z, lam * (h - shift))
        torch.testing.assert_close(ours.decode(z), vae.decode(z / lam + shift).sample)
        assert float((ours.decode(z) - vae.decode(z).sample).abs().max()) > 1e-3
    assert ours.calibrate(x) == lam and float(ours.scale) == lam  # the pipeline's, kept
    assert "scale" not in ours.state_dict()
    assert torch.isfinite(ours.loss(x, torch.Generator().manual_seed(5)))


def test_latent_dps_restores_through_the_imported_decoder(sd_folder):
    """DPS on the imported latent model measures A(D(z / lambda)) through diffusers' decoder
    and its gradient reaches the latents: the restorations differ from the unguided draws."""
    from diffusers_kit.forward_models import Inpaint
    from diffusers_kit.guidance import DPS
    from diffusers_kit.latent import DecodedOperator
    from diffusers_kit.restore import restore

    model = text_model(sd_folder, latent=True)
    operator = Inpaint(mask="center", data_shape=(1, 16, 16))
    method = DPS(operator, zeta=1.0)
    seen = method.forward_operator(model.model)
    assert isinstance(seen, DecodedOperator) and seen.data_shape == (4, 8, 8)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = operator.A(model.autoencoder.vae.decode(z / 0.5).sample)
        torch.testing.assert_close(seen.A(z), expected)
    clean = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    restored = restore(model, method, clean, DDIM(steps=5), seed=0)
    unguided = restore(model, DPS(operator, zeta=0.0), clean, DDIM(steps=5), seed=0)
    assert restored.samples.shape == (2, 1, 16, 16) and torch.isfinite(restored.samples).all()
    assert float((restored.samples - unguided.samples).abs().max()) > 1e-3


# -- dkit import of a text-to-image pipeline ---------------------------------------------------

def drawn(run, capsys, *extra: str):  # type: ignore[no-untyped-def]
    """The samples (and the sampling record) ``dkit sample RUN`` draws with DDIM 20, seed 0."""
    code, _, err = run_cli(["sample", str(run), "--solver", f"{{kind: ddim, steps: {STEPS}}}",
                            *extra], capsys)
    assert code == 0, err
    (folder,) = sorted((run / "sampling").glob("ddim-*"))[-1:]
    record = json.loads((folder / "sampling.json").read_text())
    return torch.from_numpy(np.load(folder / "samples.npz")["samples"]), record


def test_import_samples_prompts_as_the_python_api_and_restores(sd_folder, tmp_path, capsys):
    """``dkit import`` of a Stable Diffusion folder writes a run (and its nested autoencoder
    run) holding no weights; ``dkit sample`` draws what the Python API draws with the same
    prompts, negative prompt, guidance and seed; ``--prompt`` replaces the prompts; ``dkit
    restore`` restores through the decoder (DPS)."""
    run = tmp_path / "run"
    code, out, err = run_cli(["import", str(sd_folder), "--out", str(run), "--prompt",
                              PROMPTS[0], "--prompt", PROMPTS[1], "--negative-prompt", NEGATIVE],
                             capsys)
    assert code == 0, err
    said = " ".join(out.split())
    assert "in the latent space of its vae" in said and "scaled by 0.5" in said
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    assert spec["latent"]["run"] == str(run / "autoencoder")
    assert spec["network"]["conditioner"]["prompts"] == PROMPTS
    assert spec["sample"]["guidance"] == [{"kind": "classifier_free", "scale": 7.5,
                                           "rescale": 0.0, "interval": None}]
    for folder in (run, run / "autoencoder"):
        with safe_open(folder / "checkpoint.safetensors", "pt") as checkpoint:
            assert list(checkpoint.keys()) == []
        assert json.loads((folder / "run.json").read_text())["status"] == "finished"
    samples, record = drawn(run, capsys, "--n", "4")
    expected = text_model(sd_folder, latent=True).sample(
        4, DDIM(steps=STEPS), seed=0, labels="all", guidance=[ClassifierFree(scale=7.5)])
    torch.testing.assert_close(samples, expected.samples, rtol=0, atol=1e-5)
    assert record["prompts"] == PROMPTS and record["negative_prompt"] == NEGATIVE
    samples, record = drawn(run, capsys, "--n", "2", "--prompt", "a cat",
                            "--negative-prompt", "")
    conditioner = DiffusersText(str(sd_folder), prompts=["a cat"])
    model = Diffusion(DiffusersSchedule(str(sd_folder)),
                      DiffusersUNet(str(sd_folder), conditioner=conditioner), device="cpu",
                      autoencoder=DiffusersVAE(str(sd_folder), data_shape=(1, 16, 16)))
    expected = model.sample(2, DDIM(steps=STEPS), seed=0, labels="all",
                            guidance=[ClassifierFree(scale=7.5)])
    torch.testing.assert_close(samples, expected.samples, rtol=0, atol=1e-5)
    assert record["prompts"] == ["a cat"] and record["negative_prompt"] == ""
    code, _, err = run_cli(["restore", str(run), "--operator", "{kind: inpaint, mask: box}",
                            "--n", "2", "--quiet"], capsys)
    assert code == 0, err
    (restored,) = (run / "restoration").glob("dps-inpaint-*/restore.npz")
    assert np.isfinite(np.load(restored)["samples"]).all()


def import_ldm(tmp_path, capsys):  # type: ignore[no-untyped-def]
    """A tiny random LDMPipeline (UNet2DModel + VQModel) in ``tmp_path/ldm``, imported as
    ``tmp_path/run``; returns the import's console output."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=4, out_channels=4,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    vqvae = diffusers.VQModel(in_channels=1, out_channels=1, latent_channels=4,
                              num_vq_embeddings=32, block_out_channels=(8, 16),
                              down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=STEPS, clip_sample=False)
    diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(
        tmp_path / "ldm")
    code, out, err = run_cli(["import", str(tmp_path / "ldm"), "--out", str(tmp_path / "run")],
                             capsys)
    assert code == 0, err
    return out


def test_import_of_an_unconditional_vq_latent_pipeline(tmp_path, capsys):
    """An LDMPipeline (UNet2DModel + VQModel) imports with its latents unscaled, as that
    pipeline decodes them."""
    out = import_ldm(tmp_path, capsys)
    run = tmp_path / "run"
    assert "its vqvae (latents (4, 8, 8) scaled by 1)" in " ".join(out.split())
    samples, _ = drawn(run, capsys, "--n", "2")
    assert samples.shape == (2, 1, 16, 16) and torch.isfinite(samples).all()
    refused(["sample", str(run), "--prompt", "a cat"], capsys,
            "--prompt: expected a run whose network has a diffusers_text conditioner")
    refused(["import", str(tmp_path / "ldm"), "--prompt", "a cat", "--out",
             str(tmp_path / "other")], capsys, "this pipeline's U-Net does not attend to text")


def _no_tokenizer(folder) -> None:  # type: ignore[no-untyped-def]
    tiny_sd(folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["tokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _t5(folder) -> None:  # type: ignore[no-untyped-def]
    tiny_sd(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(
        {**index, "text_encoder": ["transformers", "T5EncoderModel"]}))


def _tiny_vae(folder) -> None:  # type: ignore[no-untyped-def]
    tiny_sd(folder)
    config = folder / "vae" / "config.json"
    config.write_text(config.read_text().replace('"AutoencoderKL"', '"AutoencoderTiny"'))


def _pickled_text(folder) -> None:  # type: ignore[no-untyped-def]
    tiny_sd(folder)
    weights = folder / "text_encoder" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))


@pytest.mark.parametrize(("make", "args", "message"), [
    (tiny_sd, [], "--prompt: expected at least one --prompt for a text-to-image pipeline"),
    (_no_tokenizer, ["--prompt", "a cat"], "lists no tokenizer"),
    (_t5, ["--prompt", "a cat"], "text_encoder is a T5EncoderModel, which is not supported"),
    (_tiny_vae, ["--prompt", "a cat"], "holds a AutoencoderTiny, which is not supported"),
    (_pickled_text, ["--prompt", "a cat"], "only pickle weights (pytorch_model.bin); dkit "
                                           "reads safetensors only"),
])
def test_text_pipeline_import_refusals_say_why(tmp_path, capsys, make, args, message):
    make(tmp_path / "pipe")
    refused(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "run"), *args], capsys,
            message)
    assert not (tmp_path / "run").exists()


def test_a_changed_text_encoder_is_refused(tmp_path, capsys):
    tiny_sd(tmp_path / "pipe")
    assert run_cli(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "run"),
                    "--prompt", "a cat"], capsys)[0] == 0
    vocabulary = tmp_path / "pipe" / "tokenizer" / "tokenizer.json"
    vocabulary.write_text(vocabulary.read_text().replace('"cat"', '"cow"'))
    err = refused(["sample", str(tmp_path / "run"), "--n", "2"], capsys,
                  "changed since they were imported: SHA-256")
    assert "diffusers_text: " in err and "tokenizer.json" in err


# -- dkit export of a latent run ---------------------------------------------------------------

def test_an_imported_text_run_exports_as_a_stable_diffusion_pipeline(sd_folder, tmp_path,
                                                                     capsys):
    """The exported folder loads as a StableDiffusionPipeline whose guided DDIM latents (the
    SD parity settings) equal dkit's from the same start latents."""
    run = tmp_path / "run"
    assert run_cli(["import", str(sd_folder), "--out", str(run), "--prompt", PROMPTS[0],
                    "--prompt", PROMPTS[1], "--negative-prompt", NEGATIVE], capsys)[0] == 0
    code, out, err = run_cli(["export", str(run), "--format", "diffusers",
                              str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "StableDiffusionPipeline (UNet2DConditionModel" in " ".join(out.split())
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out",
                                                                 local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vae.config.scaling_factor == 0.5 and pipeline.safety_checker is None
    pipeline.scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler.config,
                                                             set_alpha_to_one=True)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    theirs = their_latents(pipeline, [0, 1], NEGATIVE, x_T)
    ours = text_model(sd_folder, latent=True).sample(
        2, DDIM(steps=STEPS), x_T=x_T, labels=torch.tensor([0, 1]),
        guidance=[ClassifierFree(scale=7.5)])
    difference = float((ours.latents - theirs).abs().max())
    print(f"exported: max-abs {difference:.2g} of {float(theirs.abs().max()):.3g}")
    assert difference <= 1e-3


def test_an_ldm_run_exports_and_dkit_first_stages_are_refused(sd_folder, tmp_path, capsys):
    from diffusers_kit.autoencoders import KLAutoencoder
    from diffusers_kit.cli.export import check_exportable
    from diffusers_kit.processes.ddpm import DDPM

    import_ldm(tmp_path, capsys)
    code, _, err = run_cli(["export", str(tmp_path / "run"), "--format", "diffusers",
                            str(tmp_path / "out")], capsys)
    assert code == 0, err
    pipeline = diffusers.LDMPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    assert isinstance(pipeline.vqvae, diffusers.VQModel)
    assert pipeline.vqvae.config.scaling_factor == 1
    with safe_open(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors",
                   "pt") as exported, safe_open(tmp_path / "ldm" / "unet" /
                                                "diffusion_pytorch_model.safetensors",
                                                "pt") as source:
        assert set(exported.keys()) == set(source.keys())
        assert all(torch.equal(exported.get_tensor(k), source.get_tensor(k))
                   for k in source.keys())  # noqa: SIM118
    own = KLAutoencoder(data_shape=(1, 16, 16))
    network = DiffusersUNet(str(tmp_path / "ldm"))
    reason = check_exportable(DDPM(num_steps=STEPS), network, own)
    assert "KLAutoencoder, dkit's own, whose blocks are not AutoencoderKL's" in reason
    scaled = DiffusersVAE(str(tmp_path / "ldm"), data_shape=(1, 16, 16))  # 0.18215
    reason = check_exportable(DDPM(num_steps=STEPS), network, scaled)
    assert "LDMPipeline decodes its latents unscaled; this run scales them by 0.18215" in reason
    text = text_model(sd_folder)  # a text U-Net in pixel space: no pipeline to write
    reason = check_exportable(text.process, text.network, None)
    assert "a latent run for a text-conditioned U-Net" in reason


# -- the spec route ----------------------------------------------------------------------------

AUTOENCODER_SPEC = """\
name: sd_vae
device: cpu
data: {{kind: digits, size: 16, scale: symmetric}}
autoencoder: {{kind: diffusers_vae, path: {folder}}}
train: {{steps: 0}}
output: {{root: {root}}}
"""

LATENT_SPEC = """\
name: sd
device: cpu
data: {{kind: digits, size: 16, scale: symmetric}}
latent: vae.yaml                      # the imported first stage, built as a dependency
process: {{kind: diffusers_scheduler, path: {folder}}}
network:
  kind: diffusers_unet
  path: {folder}
  conditioner: {{kind: diffusers_text, path: {folder}, prompts: {prompts},
                 negative_prompt: {negative}}}
objective: {{kind: ddpm_simple}}
train: {{steps: 0, ema_decay: 0.0}}
sample:
  n: 4
  labels: all
  guidance: [{{kind: classifier_free, scale: 7.5}}]
  solver: {{kind: ddim, steps: {steps}}}
output: {{root: {root}}}
"""


def test_a_latent_spec_uses_the_imported_vae(sd_folder, tmp_path, capsys):
    """A dkit latent diffusion spec names a diffusers_vae autoencoder spec as its ``latent``:
    the autoencoder run keeps the pipeline's scale (no calibration), and the run samples what
    the Python API samples."""
    fill = {"folder": sd_folder, "root": tmp_path / "runs", "prompts": json.dumps(PROMPTS),
            "negative": json.dumps(NEGATIVE), "steps": STEPS}
    (tmp_path / "vae.yaml").write_text(AUTOENCODER_SPEC.format(**fill))
    (tmp_path / "sd.yaml").write_text(LATENT_SPEC.format(**fill))
    code, _, err = run_cli(["run", str(tmp_path / "sd.yaml")], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "runs" / "sd_vae" / "latest" / "run.json").read_text())
    assert record["status"] == "finished"
    metrics = json.loads((tmp_path / "runs" / "sd_vae" / "latest" / "metrics.json").read_text())
    assert metrics["latent_scale"] == 0.5
    samples = torch.from_numpy(np.load(tmp_path / "runs" / "sd" / "latest" /
                                       "samples.npz")["samples"])
    expected = text_model(sd_folder, latent=True).sample(
        4, DDIM(steps=STEPS), seed=0, labels="all", guidance=[ClassifierFree(scale=7.5)])
    torch.testing.assert_close(samples, expected.samples, rtol=0, atol=1e-5)
