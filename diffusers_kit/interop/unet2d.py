"""dkit's DDPM U-Net (:class:`diffusers_kit.networks.unet.UNet`) as a diffusers ``UNet2DModel``.

The two are the same architecture (Ho et al. 2020, appendix B), block for block: a residual
block ``norm1 -> SiLU -> conv1, + Linear(SiLU(emb)), norm2 -> SiLU -> dropout -> conv2, + 1x1
skip`` is ``ResnetBlock2D``; a level with self-attention is ``AttnDownBlock2D`` /
``AttnUpBlock2D`` (else ``DownBlock2D`` / ``UpBlock2D``), with the same skip connections, a
strided convolution down and nearest-neighbour upsampling then a convolution up; the middle is
``UNetMidBlock2D``. Only names change, and dkit's attention computes ``Q``, ``K``, ``V`` with one
1x1 convolution whose three output thirds are ``to_q``, ``to_k``, ``to_v``.

The time is the one difference. dkit embeds ``1000 t`` with ``[cos(w_k 1000 t), sin(w_k 1000
t)]``, ``w_k = 10000^(-k / (d/2))``, which is diffusers' positional embedding
(``flip_sin_to_cos=True``, ``freq_shift=0``) of the same number. At step ``i`` of a chain of T
steps (``t = i / T``) dkit embeds ``1000 i / T``, while diffusers' pipelines call the U-Net at
timestep ``i - 1`` (:mod:`diffusers_kit.networks.diffusers_unet`). For T = 1000 that is ``i =
(i - 1) + 1``: a shift by one, and ``cos(w (s + 1)) = cos(w s) cos w - sin(w s) sin w``,
``sin(w (s + 1)) = sin(w s) cos w + cos(w s) sin w`` make the features at ``s + 1`` a rotation
``R`` of those at ``s``, which the time MLP's first layer absorbs exactly: ``W' = W R``. For
another T the embedding would need its frequencies scaled by ``1000 / T``, which
``UNet2DModel`` cannot express, so only T = 1000 maps.

Duck-typed on the network (a leaf module: it imports no component).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

#: the only chain length whose time embedding maps (see the module doc)
MAPPED_STEPS = 1000

_RESNET = {"emb": "time_emb_proj", "skip": "conv_shortcut"}


def unet2d_refusal(network: Any, num_steps: int) -> str | None:
    """Why ``network`` (a dkit ``unet``) has no ``UNet2DModel`` counterpart on a chain of
    ``num_steps`` steps, or None when it has one."""
    if num_steps != MAPPED_STEPS:
        return (f"a chain of T = {MAPPED_STEPS} steps for dkit's own U-Net (network kind 'unet'): "
                f"it embeds the time as 1000 t, so at step i it sees 1000 i / {num_steps}, where "
                "a diffusers pipeline passes timestep i - 1; UNet2DModel's embedding can absorb "
                "the shift by one of T = 1000, not a scale")
    if network.classes is not None or network.conditioner is not None:
        return ("an unconditional U-Net (this one takes class labels, which DDPMPipeline and "
                "DDIMPipeline do not pass)")
    if network.learned_variance:
        return "a U-Net without learned variances"
    if network.time.kind != "sinusoidal":
        return f"a sinusoidal time embedding (this U-Net's is {network.time.kind})"
    first = network.down[0].blocks[0].conv1.out_channels
    if network.conv_in.out_channels != first:
        return (f"a first level as wide as the input convolution (channel_mult starting at 1; "
                f"here conv_in has {network.conv_in.out_channels} channels and the first level "
                f"{first}): UNet2DModel's conv_in and time embedding take the first level's "
                "width")
    if _attention_heads(network) is False:
        return ("attention heads of one width in every attention block (UNet2DModel fixes the "
                "width of a head; dkit's unet fixes their count, here "
                f"{_head_counts(network)})")
    return None


def _attention_blocks(network: Any) -> list[Any]:
    blocks = [network.mid_attn]
    for level in [*network.down, *network.up]:
        blocks += [a for a in level.attention if hasattr(a, "qkv")]
    return blocks


def _head_counts(network: Any) -> str:
    return ", ".join(sorted({f"{a.heads} of width {a.norm.num_channels // a.heads}"
                             for a in _attention_blocks(network)}))


def _attention_heads(network: Any) -> int | bool | None:
    """``UNet2DModel``'s ``attention_head_dim``: None (one head per block, as wide as the
    block) when every block has one head, the common width when every head has the same one,
    else False (no counterpart)."""
    blocks = _attention_blocks(network)
    if all(a.heads == 1 for a in blocks):
        return None
    widths = {a.norm.num_channels // a.heads for a in blocks}
    return widths.pop() if len(widths) == 1 else False


def unet2d_config(network: Any) -> dict[str, Any]:
    """The ``UNet2DModel`` config of ``network`` (checked by :func:`unet2d_refusal`)."""
    channels, height, width = network.data_shape
    widths = [level.blocks[0].conv1.out_channels for level in network.down]
    attention = [any(hasattr(a, "qkv") for a in level.attention) for level in network.down]
    heads = _attention_heads(network)
    return {
        "sample_size": height if height == width else (height, width),
        "in_channels": channels, "out_channels": channels,
        "block_out_channels": widths,
        "layers_per_block": len(network.down[0].blocks),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "attention_head_dim": heads, "norm_num_groups": network.norm_out.num_groups,
        "norm_eps": network.norm_out.eps, "time_embedding_type": "positional",
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "add_attention": True,
        "downsample_type": "conv", "upsample_type": "conv", "downsample_padding": 1,
        "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default",
        "num_train_timesteps": MAPPED_STEPS, "dropout": network.down[0].blocks[0].dropout.p,
    }


def shifted_time_layer(weight: torch.Tensor) -> torch.Tensor:
    """``W R``: the time MLP's first weight for features of timestep ``s`` that reproduces
    ``W`` on the features of ``s + 1`` (module doc). The frequencies are diffusers' float32
    ones; the product is formed in float64."""
    dim = weight.shape[1]
    half = dim // 2
    exponent = -math.log(10_000) * torch.arange(0, half, dtype=torch.float32) / half
    w = torch.exp(exponent).double()
    cos, sin = torch.cos(w), torch.sin(w)
    W = weight.double()
    shifted = W.clone()
    W_c, W_s = W[:, :half], W[:, half:2 * half]
    shifted[:, :half] = W_c * cos + W_s * sin
    shifted[:, half:2 * half] = W_s * cos - W_c * sin
    return shifted.to(weight.dtype)


def _resnet_key(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET.get(name, name)}.{tail}"


def unet2d_state(network: Any) -> dict[str, torch.Tensor]:
    """``network``'s weights under ``UNet2DModel``'s names (module doc)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in network.state_dict().items():
        value = value.detach()
        if key.startswith("time.mlp."):
            layer, _, kind = key[len("time.mlp."):].partition(".")
            name = {"0": "linear_1", "2": "linear_2"}[layer]
            if name == "linear_1" and kind == "weight":
                value = shifted_time_layer(value)
            out[f"time_embedding.{name}.{kind}"] = value
        elif key.startswith(("conv_in.", "conv_out.")):
            out[key] = value
        elif key.startswith("norm_out."):
            out["conv_norm_out." + key[len("norm_out."):]] = value
        elif m := re.fullmatch(r"(down|up)\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            out[f"{m[1]}_blocks.{m[2]}.resnets.{m[3]}.{_resnet_key(m[4])}"] = value
        elif m := re.fullmatch(r"(down|up)\.(\d+)\.attention\.(\d+)\.(.+)", key):
            _attention(out, f"{m[1]}_blocks.{m[2]}.attentions.{m[3]}", m[4], value)
        elif m := re.fullmatch(r"(downsample|upsample)\.(\d+)\.(.+)", key):
            where = "down_blocks" if m[1] == "downsample" else "up_blocks"
            out[f"{where}.{m[2]}.{m[1]}rs.0.conv.{m[3]}"] = value
        elif m := re.fullmatch(r"mid([12])\.(.+)", key):
            out[f"mid_block.resnets.{int(m[1]) - 1}.{_resnet_key(m[2])}"] = value
        elif key.startswith("mid_attn."):
            _attention(out, "mid_block.attentions.0", key[len("mid_attn."):], value)
        else:
            raise KeyError(f"no UNet2DModel counterpart for dkit's unet weight {key}")
    return out


def _attention(out: dict[str, torch.Tensor], prefix: str, rest: str, value: torch.Tensor
               ) -> None:
    name, _, kind = rest.partition(".")
    if name == "norm":
        out[f"{prefix}.group_norm.{kind}"] = value
    elif name == "proj":
        out[f"{prefix}.to_out.0.{kind}"] = value.flatten(1) if kind == "weight" else value
    elif name == "qkv":
        flat = value.flatten(1) if kind == "weight" else value
        for part, chunk in zip(("to_q", "to_k", "to_v"), flat.chunk(3, dim=0), strict=True):
            out[f"{prefix}.{part}.{kind}"] = chunk.clone()
    else:
        raise KeyError(f"no UNet2DModel counterpart for dkit's attention weight {rest}")
