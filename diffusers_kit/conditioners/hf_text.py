"""A pretrained Hugging Face text encoder as conditioner (``hf_text``), e.g. CLIP's text
transformer as in Stable Diffusion (Rombach et al. 2022): captions from labels, as for
:mod:`diffusers_kit.conditioners.text`, encoded by a model loaded from a **local** folder
(``save_pretrained``; nothing is downloaded), then a learned linear projection to ``dim``.

Needs the optional ``transformers`` dependency (``pip install diffusers_kit[text]``), imported
only when an ``hf_text`` conditioner is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from diffusers_kit.conditioners.base import Conditioner
from diffusers_kit.conditioners.text import DIGIT_NAMES, label_captions
from diffusers_kit.hookspecs import OptionError

MISSING = ("hf_text needs the transformers library, which is not installed: install the optional "
           "'text' extra: pip install diffusers_kit[text]")


def _text_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The part of ``model`` that encodes text: CLIP-like dual encoders' text tower, the encoder
    of an encoder-decoder (T5), or the model itself (BERT, CLIPTextModel)."""
    if hasattr(model, "text_model") and hasattr(model, "vision_model"):
        return model.text_model
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return model


def _text_config(config: Any) -> Any:
    """The text part of a model's configuration (``get_text_config`` is transformers >= 4.45)."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", config)


class HFTextEncoder(Conditioner):
    """Label -> caption -> a Hugging Face text encoder's last hidden states ->
    ``Linear(hidden_size, dim)``: a ``(tokens, dim)`` context.

    The encoder is **frozen** by default (not trained, kept in eval mode, the labels' encodings
    computed once and cached); only the projection is trained with the network. With
    ``fine_tune`` the encoder is trained too. As in Stable Diffusion, captions are padded to
    ``tokens`` and the encoder sees the whole padded sequence (no attention mask), so the
    context of every caption has the same length. The null label's context is the encoding of
    the empty caption ``""`` (the tokenizer's special tokens and padding). Checkpoints hold the
    encoder's weights too, so a run does not depend on the folder staying unchanged.

    Args:
        path: a local folder holding a text model and its tokenizer, both saved with
            ``save_pretrained`` (relative to the working directory); loaded with
            ``local_files_only``.
        names: the name of each class, in label order (``num_classes = len(names)``).
        template: the caption of a label, ``{}`` standing for its name.
        tokens: context length: captions are padded (and free text truncated) to this many
            tokens, special tokens included.
        dim: width of the context (the projection's output).
        fine_tune: also train the encoder (default: frozen, only the projection learns).
    """

    def __init__(
        self,
        path: Annotated[str, Field(min_length=1, max_length=4096)],
        names: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]],
                         Field(min_length=1, max_length=100_000)] = DIGIT_NAMES,
        template: Annotated[str, Field(min_length=2, max_length=1000)] = "a handwritten {}",
        tokens: Annotated[int, Field(ge=1, le=512)] = 16,
        dim: Annotated[int, Field(ge=1, le=4096)] = 64,
        fine_tune: bool = False,
    ) -> None:
        super().__init__()
        try:
            import transformers
        except ImportError as exc:
            raise ValueError(MISSING) from exc
        captions = label_captions(template, names)
        folder = Path(os.path.expanduser(path))
        if not folder.is_dir():
            raise ValueError(f"path {path!r} is not a folder; hf_text loads a text model and its "
                             "tokenizer saved with save_pretrained from a local folder (nothing "
                             "is downloaded)")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError ...
            raise ValueError(f"cannot load a Hugging Face text model and tokenizer from "
                             f"{path!r}: {type(exc).__name__}: {exc}") from exc
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer in {path!r} has neither a pad nor an end token "
                                 "to pad captions with")
            tokenizer.pad_token = tokenizer.eos_token
        config = _text_config(model.config)
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and tokens > limit:
            raise OptionError("tokens", f"at most the {limit} positions of the model in "
                              f"{path!r}", tokens)
        lengths = [len(ids) for ids in tokenizer(captions)["input_ids"]]
        longest = max(range(len(captions)), key=lambda i: lengths[i])
        if lengths[longest] > tokens:
            raise OptionError("tokens", f"at least {lengths[longest]}: the caption "
                              f"{captions[longest]!r} needs them (too short otherwise)", tokens)
        self.names = list(names)
        self.template = template
        self.path = str(path)
        self.num_classes = len(names)
        self.tokens = tokens
        self.dim = dim
        self.fine_tune = bool(fine_tune)
        self.tokenizer: Any = tokenizer
        self.encoder = _text_encoder(model)
        self.encoder.requires_grad_(self.fine_tune)
        if not self.fine_tune:
            self.encoder.eval()
        self.projection = torch.nn.Linear(config.hidden_size, dim)
        # the captions of labels 0 .. num_classes - 1, then the null label's empty caption
        self.register_buffer("caption_ids", self.tokenize([*captions, ""]), persistent=False)
        self._cache: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(_forget_cache)

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        if not self.fine_tune:  # a frozen encoder keeps its dropout off
            self.encoder.eval()
        return self

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """``(len(captions), tokens)`` long ids: padded to ``tokens``, truncated beyond."""
        out = self.tokenizer(list(captions), padding="max_length", max_length=self.tokens,
                             truncation=True, return_tensors="pt")
        return out["input_ids"].long()

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden states ``(n, tokens, hidden_size)`` (no gradient when
        frozen)."""
        with torch.set_grad_enabled(self.fine_tune and torch.is_grad_enabled()):
            return self.encoder(input_ids=ids).last_hidden_state

    def _caption_hidden(self) -> torch.Tensor:
        if self.fine_tune:
            return self.hidden(self.caption_ids)
        cache = self._cache
        dtype = next(self.encoder.parameters()).dtype
        if cache is None or cache.device != self.caption_ids.device or cache.dtype != dtype:
            cache = self._cache = self.hidden(self.caption_ids).detach()
        return cache

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """The context of free-text captions (what a ``--prompt`` would use)."""
        hidden = self.hidden(self.tokenize(captions).to(self.caption_ids.device))
        return self.projection(hidden.to(self.projection.weight.dtype))

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        labels = self.labels(y, batch, device)
        if self.caption_ids.shape[0] <= batch:  # fewer captions than samples: encode each once
            hidden = self._caption_hidden()
            return self.projection(hidden.to(self.projection.weight.dtype))[labels]
        hidden = self.hidden(self.caption_ids[labels])
        return self.projection(hidden.to(self.projection.weight.dtype))


def _forget_cache(module: torch.nn.Module, incompatible_keys: Any) -> None:
    """New weights loaded: the cached encodings of the captions are stale."""
    module._cache = None  # type: ignore[assignment]


__all__ = ["HFTextEncoder"]
