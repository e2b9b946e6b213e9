"""A diffusers ``AutoencoderKL`` or ``VQModel`` as a dkit first stage (``diffusers_vae``).

The autoencoder is read from a local folder (a pipeline saved with ``save_pretrained``, whose
``vae/`` or ``vqvae/`` is read, or that component folder itself), safetensors only. diffusers'
latent pipelines scale the first stage's latent ``h`` by the config's ``scaling_factor``
``lambda`` (and, where the config has one, shift it by ``shift_factor`` ``mu``) before the
diffusion sees it, and undo it before decoding (Rombach et al. 2022, sec. 4.3.2 and app. D.1)::

    z_0 = lambda (h - mu),        x = D(z_0 / lambda + mu)

dkit applies its own latent scale in exactly one place, :meth:`Autoencoder.encode
<diffusers_kit.autoencoders.base.Autoencoder.encode>` / ``decode`` (``scale * z`` and
``z / scale``), so here ``scale`` is ``lambda`` and the shift lives in the unscaled maps:
``encode_unscaled(x) = h - mu`` and ``decode_unscaled(z) = D(z + mu)``. The factor is the
pipeline's, fixed: :meth:`DiffusersVAE.calibrate` keeps it.

``h`` is what diffusers' ``encode`` gives: the posterior mean of an ``AutoencoderKL`` (a draw
``mean + std eps`` with a generator), the latent before quantisation of a ``VQModel``, whose
``decode`` snaps it to the codebook (as the original latent diffusion models do; dkit's own
``vq`` returns the quantised code, which decodes to the same image).

Needs the optional ``diffusers`` dependency, imported only when a ``diffusers_vae`` is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.autoencoders.base import Autoencoder
from diffusers_kit.autoencoders.blocks import reconstruction_error
from diffusers_kit.autoencoders.kl import gaussian_kl
from diffusers_kit.interop.diffusers_folder import (
    MODEL_CONFIG,
    MODEL_INDEX,
    ByteCount,
    Fingerprint,
    LocalPath,
    check_class,
    component_folder,
    forgive_referenced,
    listed_components,
    load_model,
    read_json,
)

MISSING = ("diffusers_vae needs the diffusers library, which is not installed: install the "
           "optional 'diffusers' extra: pip install diffusers_kit[diffusers]")

#: the autoencoder classes read
VAE_CLASSES = ("AutoencoderKL", "VQModel")
#: the names pipelines give their first stage, in the order they are looked for
VAE_COMPONENTS = ("vae", "vqvae")


def vae_folder(path: str, user: str = "diffusers_vae") -> Path:
    """The first stage's folder of a pipeline folder (its ``vae/`` or ``vqvae/``), or ``path``
    itself when it is a component folder (or its ``config.json``)."""
    given = Path(os.path.expanduser(path))
    if given.is_dir() and (given / MODEL_INDEX).is_file():
        listed = listed_components(read_json(given / MODEL_INDEX))
        name = next((c for c in VAE_COMPONENTS if c in listed), VAE_COMPONENTS[0])
        return component_folder(path, name, MODEL_CONFIG, user)
    return component_folder(path, VAE_COMPONENTS[0], MODEL_CONFIG, user)


class DiffusersVAE(Autoencoder):
    """A diffusers ``AutoencoderKL`` / ``VQModel`` from a local folder, its latents scaled by
    the config's ``scaling_factor`` (and shifted by ``shift_factor``) as the module doc says.

    Args:
        path: a local diffusers pipeline folder (its ``vae/`` or ``vqvae/`` is read) or the
            autoencoder's own folder, relative to the working directory; weights from
            ``diffusion_pytorch_model.safetensors`` only.
        scale: the latent scale ``lambda``; default the config's ``scaling_factor``. Set it
            where the pipeline that trained the diffusion on these latents did not scale them
            (diffusers' unconditional ``LDMPipeline`` decodes its VQ latents unscaled: 1).
        kl_weight: the KL term's weight when an ``AutoencoderKL`` is fine-tuned (the loss is
            ``mean |x - D(h)| + kl_weight KL / (C H W)``, as dkit's ``kl``); a ``VQModel``
            adds its commitment loss instead.
        sha256: the fingerprint of ``config.json`` and the weight file(s) as ``dkit import``
            found them; when set they are checked first, and a checkpoint may leave the
            weights out (they are then the file's, as for ``diffusers_unet``).
        size: the total byte count of those files.
    """

    def __init__(
        self,
        path: LocalPath,
        scale: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = None,
        kl_weight: Annotated[float, Field(ge=0, le=1)] = 1e-6,
        sha256: Fingerprint | None = None,
        size: ByteCount | None = None,
        *,
        data_shape: tuple[int, ...],
    ) -> None:
        super().__init__()
        user = "diffusers_vae"
        folder = vae_folder(path, user)
        config = read_json(folder / MODEL_CONFIG)
        kind = check_class(config, VAE_CLASSES, folder, user)
        channels = int(config.get("in_channels", 3))
        factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
        shape = tuple(int(s) for s in data_shape)
        if len(shape) != 3 or shape[0] != channels or shape[1] % factor or shape[2] % factor:
            raise ValueError(f"{user}: the {kind} in {folder} takes images of {channels} "
                             f"channels with sides divisible by {factor}; this data set's "
                             f"examples have shape {shape}")
        vae = load_model(folder, kind, sha256, size, user, MISSING)
        self.vae = vae
        self.kind = kind
        self.path = str(path)
        self.kl_weight = float(kl_weight)
        self.data_shape = shape
        latent = int(vae.config.get("vq_embed_dim") or vae.config.latent_channels)
        self.latent_shape = (latent, shape[1] // factor, shape[2] // factor)
        factor_scale = float(vae.config.get("scaling_factor") or 1.0) if scale is None else scale
        self.shift = float(vae.config.get("shift_factor") or 0.0)
        # the pipeline's factor, fixed: not a calibrated value, so not saved
        self.register_buffer("scale", torch.tensor(factor_scale), persistent=False)
        self.referenced = sha256 is not None
        if self.referenced:
            self.register_load_state_dict_post_hook(
                lambda module, incompatible: forgive_referenced(module.vae, "vae.",
                                                                incompatible))

    def encode_unscaled(self, x: torch.Tensor, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
        """``h - mu``: the posterior mean (a draw ``mean + std eps`` with ``generator``) of an
        ``AutoencoderKL``, the latent before quantisation of a ``VQModel``."""
        if self.kind == "VQModel":
            return self.vae.encode(x).latents - self.shift
        posterior = self.vae.encode(x).latent_dist
        if generator is None:
            return posterior.mean - self.shift
        noise = torch.randn(posterior.mean.shape, device=x.device, dtype=x.dtype,
                            generator=generator)
        return posterior.mean + posterior.std * noise - self.shift

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """``D(z + mu)`` (a ``VQModel`` quantises ``z + mu`` first)."""
        return self.vae.decode(z + self.shift).sample

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fine-tuning: ``mean |x - D(h)| + kl_weight KL / (C H W)`` with ``h`` a posterior
        draw (``AutoencoderKL``, the KL of :func:`~diffusers_kit.autoencoders.kl.gaussian_kl`),
        or ``mean |x - D(h)|`` plus the codebook's commitment loss (``VQModel``)."""
        if self.kind == "VQModel":
            decoded = self.vae.decode(self.vae.encode(x).latents)
            return reconstruction_error(decoded.sample, x, "l1") + decoded.commit_loss.mean()
        posterior = self.vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, device=x.device, dtype=x.dtype,
                            generator=generator)
        decoded = self.vae.decode(posterior.mean + posterior.std * noise).sample
        kl = gaussian_kl(posterior.mean, posterior.logvar).mean() / x[0].numel()
        return reconstruction_error(decoded, x, "l1") + self.kl_weight * kl

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 256) -> float:
        """The pipeline's latent scale, kept: the diffusion that goes with these weights was
        trained on latents scaled by it (module doc), so it is not re-estimated."""
        return float(self.scale)

    def extra_repr(self) -> str:
        return f"{self.kind} from {self.path!r}, scale {float(self.scale):.6g}"


__all__ = ["VAE_CLASSES", "DiffusersVAE", "vae_folder"]
