"""Text-conditioned latent diffusers pipelines (Stable Diffusion's layout) as dkit models, with
diffusers itself as the oracle.

Every pipeline here is a tiny random one the test builds: a ``UNet2DConditionModel``, an
``AutoencoderKL`` (or a ``VQModel``), a ``CLIPTextModel`` and a word-level tokenizer built from a
local vocabulary (``tests.helpers.word_tokenizer``), saved with ``save_pretrained``; nothing is
downloaded.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers_kit.autoencoders.diffusers_vae import DiffusersVAE  # noqa: E402
from diffusers_kit.conditioners.diffusers_text import DiffusersText  # noqa: E402
from diffusers_kit.diffusion import Diffusion  # noqa: E402
from diffusers_kit.guidance import ClassifierFree  # noqa: E402
from diffusers_kit.networks.diffusers_unet import DiffusersUNet  # noqa: E402
from diffusers_kit.processes.diffusers_scheduler import DiffusersSchedule  # noqa: E402
from diffusers_kit.solvers import DDIM  # noqa: E402
from tests.helpers import word_tokenizer  # noqa: E402

WORDS = ["a", "photo", "of", "dog", "cat", "blurry", "drawing"]
PROMPTS = ["a photo of a dog", "a drawing of a cat"]
NEGATIVE = "blurry drawing"
#: the chain: T = 20 with 20 DDIM steps, where diffusers' trailing grid is dkit's uniform one
STEPS = 20


def tiny_sd(folder, num_class_embeds: int | None = None, vae: str = "kl"):  # type: ignore[no-untyped-def]
    """A tiny random Stable Diffusion pipeline (1-channel 16 x 16 images, 4 x 8 x 8 latents,
    a 12-wide CLIP text encoder with 8 tokens), saved to ``folder``."""
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
    scheduler = diffusers.DDIMScheduler(
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


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_guided_ddim_equals_the_stable_diffusion_pipeline(sd_folder, negative):
    """dkit's DDIM (20 steps on T = 20) with classifier-free guidance 7.5 equals
    StableDiffusionPipeline's latents (output_type="latent") from the same start latents, with
    a negative prompt and with the empty one."""
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = [0, 1, 0, 1]
    with torch.no_grad():
        theirs = pipeline([PROMPTS[i] for i in labels], negative_prompt=[negative] * 4,
                          height=16, width=16, num_inference_steps=STEPS, guidance_scale=7.5,
                          eta=0.0, latents=x_T.clone(), output_type="latent").images
    ours = text_model(sd_folder, negative, latent=True).sample(
        4, DDIM(steps=STEPS, eta=0.0), x_T=x_T, labels=torch.tensor(labels),
        guidance=[ClassifierFree(scale=7.5)])
    assert ours.nfe == STEPS  # one call on the doubled batch per step
    difference = float((ours.latents - theirs).abs().max())
    with torch.no_grad():  # the images: the pipeline's decode of latents / scaling_factor
        images = pipeline.vae.decode(theirs / pipeline.vae.config.scaling_factor).sample
    assert float((ours.samples - images).abs().max()) <= 1e-3
    print(f"negative {negative!r}: max-abs {difference:.2g} of {float(theirs.abs().max()):.3g}")
    assert difference <= 1e-3
    assert 0.5 < float(theirs.abs().max()) < 50.0
    unguided = text_model(sd_folder, negative).sample(
        4, DDIM(steps=STEPS, eta=0.0), x_T=x_T, labels=torch.tensor(labels))
    assert float((unguided.samples - theirs).abs().max()) > 1e-2  # the guidance matters


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
