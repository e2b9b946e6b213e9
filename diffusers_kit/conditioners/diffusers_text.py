"""A diffusers pipeline's own text encoder as conditioner (``diffusers_text``): the
``text_encoder/`` (a CLIP text transformer) and ``tokenizer/`` of a Stable-Diffusion-style
pipeline folder, read with ``transformers`` (safetensors only, nothing downloaded).

The context of a prompt is what the pipeline's U-Net was trained to attend to, exactly as
``StableDiffusionPipeline.encode_prompt`` forms it (Rombach et al. 2022, sec. 3.3): the prompt
tokenized, padded to the tokenizer's ``model_max_length`` and truncated there, and the text
encoder's last hidden states over the whole padded sequence (an attention mask only when the
encoder's config asks for one)::

    c(prompt) = text_encoder(pad(tokenize(prompt))).last_hidden_state      # (tokens, hidden)

No projection follows: the width is the encoder's ``hidden_size``, the U-Net's
``cross_attention_dim``. Label ``i`` is ``prompts[i]``; the null label (what classifier-free
guidance uses for the unconditional prediction) is ``negative_prompt``, the empty prompt by
default. So dkit's guided prediction ``eps(c_neg) + w (eps(c_i) - eps(c_neg))`` is the
pipeline's ``noise_pred_uncond + guidance_scale (noise_pred_text - noise_pred_uncond)`` with its
``negative_prompt`` (Ho & Salimans 2022).

The encoder is frozen and the prompts are fixed, so their contexts are computed once, when the
conditioner is built, and kept as a buffer that is not saved: a checkpoint holds no copy of the
text encoder, whose files the run references (``sha256`` checks them).

Needs the optional ``transformers`` dependency (``pip install diffusers_kit[text]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from diffusers_kit.conditioners.base import Conditioner
from diffusers_kit.interop.diffusers_folder import (
    MODEL_CONFIG,
    MODEL_INDEX,
    Fingerprint,
    LocalPath,
    check_fingerprint,
    listed_components,
    read_json,
)

MISSING = ("diffusers_text needs the transformers library, which is not installed: install the "
           "optional 'text' extra: pip install diffusers_kit[text]")

#: the text encoder classes whose last hidden states a diffusers U-Net attends to
TEXT_ENCODERS = ("CLIPTextModel",)
#: the weight file transformers writes with save_pretrained (safetensors)
TEXT_WEIGHTS = "model.safetensors"
#: the most tokens a prompt context may have (CLIP's is 77)
MAX_TOKENS = 512


def text_files(folder: Path) -> list[Path]:
    """The files of a pipeline's text encoder and tokenizer that :class:`DiffusersText` reads,
    in a fixed order (what ``sha256`` fingerprints)."""
    encoder = [folder / "text_encoder" / MODEL_CONFIG, folder / "text_encoder" / TEXT_WEIGHTS]
    tokenizer = sorted(p for p in (folder / "tokenizer").iterdir() if p.is_file())
    return [*encoder, *tokenizer]


def check_text_folder(folder: Path, user: str) -> None:
    """``folder`` is a pipeline whose ``model_index.json`` lists a supported ``text_encoder``
    (safetensors weights) and a ``tokenizer``; a ValueError saying what is wrong otherwise."""
    index_file = folder / MODEL_INDEX
    if not index_file.is_file():
        raise ValueError(f"{user}: {folder} is not a diffusers pipeline folder (no {MODEL_INDEX})")
    listed = listed_components(read_json(index_file))
    for name in ("text_encoder", "tokenizer"):
        if name not in listed:
            raise ValueError(f"{user}: the pipeline in {folder} has no {name} (its {MODEL_INDEX} "
                             f"lists {', '.join(sorted(listed)) or 'nothing'})")
        if not (folder / name).is_dir():
            raise ValueError(f"{user}: the {name} component is missing: {MODEL_INDEX} lists it "
                             f"but {folder / name} does not exist")
    kind = listed["text_encoder"]
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"{user}: the pipeline's text_encoder is a {kind}, which is not "
                         f"supported; {user} reads {' / '.join(TEXT_ENCODERS)}")
    if not (folder / "text_encoder" / TEXT_WEIGHTS).is_file():
        pickles = sorted(p.name for p in (folder / "text_encoder").glob("*.bin"))
        raise ValueError(f"{user}: {folder / 'text_encoder'} has no {TEXT_WEIGHTS}"
                         + (f", only pickle weights ({', '.join(pickles)}); dkit reads "
                            "safetensors only, since unpickling a file can run code"
                            if pickles else ""))


class DiffusersText(Conditioner):
    """Prompt ``i`` (label ``i``) -> the pipeline's text encoder's last hidden states
    ``(tokens, hidden_size)``; the null label -> ``negative_prompt``'s (module doc).

    Args:
        path: a local diffusers pipeline folder (``save_pretrained``) holding ``text_encoder/``
            (``CLIPTextModel``, ``model.safetensors``) and ``tokenizer/``.
        prompts: the prompt of each label, in label order (``num_classes = len(prompts)``).
        negative_prompt: the null label's prompt: what classifier-free guidance guides away
            from (the pipeline's ``negative_prompt``; empty: the unconditional prompt). When
            the U-Net is fine-tuned, dropped labels take this context too: leave it empty to
            fine-tune as Stable Diffusion was trained (dropping to the empty prompt).
        sha256: the fingerprint of the text encoder's and tokenizer's files as ``dkit import``
            found them (:func:`text_files`); when set they are checked before they are read.
    """

    def __init__(
        self,
        path: LocalPath,
        prompts: Annotated[list[Annotated[str, Field(max_length=10_000)]],
                           Field(min_length=1, max_length=100_000)],
        negative_prompt: Annotated[str, Field(max_length=10_000)] = "",
        sha256: Fingerprint | None = None,
    ) -> None:
        super().__init__()
        user = "diffusers_text"
        folder = Path(os.path.expanduser(path))
        if not folder.is_dir():
            raise ValueError(f"{user}: {path!r} is not a folder; expected a local diffusers "
                             "pipeline folder with text_encoder/ and tokenizer/")
        check_text_folder(folder, user)
        if sha256 is not None:
            check_fingerprint(text_files(folder), sha256, None, user)
        try:
            import transformers
        except ImportError as exc:
            raise ValueError(MISSING) from exc
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer",
                                                                   local_files_only=True)
            encoder = transformers.CLIPTextModel.from_pretrained(
                folder / "text_encoder", local_files_only=True, use_safetensors=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError ...
            raise ValueError(f"{user}: cannot load the text encoder and tokenizer of {folder}: "
                             f"{type(exc).__name__}: {exc}") from exc
        tokens = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if not 1 <= tokens <= MAX_TOKENS:
            raise ValueError(f"{user}: the tokenizer in {folder / 'tokenizer'} has "
                             f"model_max_length {tokens}; a prompt context of 1 to "
                             f"{MAX_TOKENS} tokens is needed")
        self.path = str(path)
        self.prompts = list(prompts)
        self.negative_prompt = negative_prompt
        self.num_classes = len(prompts)
        self.tokens = tokens
        self.dim = int(encoder.config.hidden_size)
        contexts = encode_prompts(tokenizer, encoder.eval(), [*prompts, negative_prompt])
        # labels 0 .. num_classes - 1, then the null label: fixed, so not saved
        self.register_buffer("contexts", contexts, persistent=False)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        return self.contexts[self.labels(y, batch, device).to(self.contexts.device)]


@torch.no_grad()
def encode_prompts(tokenizer: Any, encoder: torch.nn.Module, prompts: list[str]
                   ) -> torch.Tensor:
    """``(len(prompts), model_max_length, hidden_size)``: each prompt padded to the tokenizer's
    ``model_max_length`` (truncated beyond), through the encoder, its last hidden states; an
    attention mask only where the encoder's config sets ``use_attention_mask`` (module doc)."""
    inputs = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    mask = inputs["attention_mask"] if getattr(encoder.config, "use_attention_mask",
                                               False) else None
    return encoder(inputs["input_ids"], attention_mask=mask)[0].float()


__all__ = ["DiffusersText", "encode_prompts"]
