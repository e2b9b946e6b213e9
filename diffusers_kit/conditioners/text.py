"""Text conditioning trained from scratch (conditioner ``text``): a caption per class label, a
word-level tokenizer and a small transformer encoder trained jointly with the diffusion network.

Label ``c`` becomes the caption ``template`` with ``{}`` replaced by ``names[c]`` ("a handwritten
seven"); the caption is tokenized (:class:`WordTokenizer`) and encoded by a transformer
(Vaswani et al. 2017) into the ``(tokens, dim)`` context the U-Net cross-attends to — the
``tau_theta(y)`` of Rombach et al. 2022, sec. 3.3, learned end to end with the denoiser (their
text-to-image LDM also trains its transformer from scratch). The null label (``num_classes``) is
the **empty caption** ``""``, whose context the encoder computes like any other (the start token
and padding), so :meth:`TextConditioner.encode_text` of free text and of ``""`` lives in the
same space as the labels' captions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Annotated

import torch
from pydantic import Field

from diffusers_kit.conditioners.base import Conditioner
from diffusers_kit.hookspecs import OptionError

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def label_captions(template: str, names: Sequence[str]) -> list[str]:
    """The caption of every label, ``template`` with ``{}`` replaced by its name; ValueError for
    a template without exactly one ``{}``, or names whose captions cannot be told apart."""
    if template.count("{}") != 1:
        raise ValueError(f"template must contain '{{}}' exactly once (where the label's name "
                         f"goes), e.g. 'a handwritten {{}}'; got {template!r}")
    seen: dict[tuple[str, ...], str] = {}
    for name in names:
        words = tuple(WordTokenizer.words(name))
        if not words:
            raise ValueError(f"names: {name!r} has no word, so its caption would be the "
                             "template alone")
        if words in seen:
            raise ValueError(f"names {seen[words]!r} and {name!r} give the same caption (the "
                             "tokenizer lower-cases and splits on spaces and punctuation)")
        seen[words] = name
    return [template.replace("{}", name) for name in names]


class WordTokenizer:
    """Lower-cased words and punctuation marks -> ids, padded to ``length``.

    The vocabulary is built deterministically from ``texts`` (sorted): ``<pad>`` = 0,
    ``<unk>`` = 1, ``<start>`` = 2, then the words. Every sequence begins with ``<start>`` (so even
    the empty caption has a token to attend from); words outside the vocabulary become ``<unk>``;
    sequences longer than ``length`` are truncated.
    """

    PAD, UNK, START = "<pad>", "<unk>", "<start>"

    def __init__(self, texts: Iterable[str], length: int) -> None:
        words = sorted({w for text in texts for w in self.words(text)})
        self.vocabulary = [self.PAD, self.UNK, self.START, *words]
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.length = length

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @property
    def pad_id(self) -> int:
        return self.index[self.PAD]

    def ids(self, text: str) -> list[int]:
        """The untruncated ids of ``text``, the start token first."""
        unk = self.index[self.UNK]
        return [self.index[self.START], *(self.index.get(w, unk) for w in self.words(text))]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), length)`` long ids."""
        out = torch.full((len(texts), self.length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.ids(text)[: self.length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The words of each row of ids, joined by spaces (start and padding left out)."""
        skip = {self.pad_id, self.index[self.START]}
        return [" ".join(self.vocabulary[i] for i in row if i not in skip)
                for row in ids.tolist()]


class TextConditioner(Conditioner):
    """Captions from labels (``template`` + ``names``), a word-level tokenizer and a small
    transformer encoder trained with the network: label -> ``(tokens, dim)`` context.

    The encoder: token embedding + learned positions -> ``layers`` pre-norm transformer encoder
    layers (``heads`` heads, feed-forward width ``4 dim``, padding masked out) -> LayerNorm.
    The null label's context is the encoding of the empty caption ``""``.

    Args:
        names: the name of each class, in label order (``num_classes = len(names)``); default
            the digits "zero" .. "nine".
        template: the caption of a label, ``{}`` standing for its name.
        tokens: context length: the start token plus at most ``tokens - 1`` words (every label's
            caption must fit; free text is truncated).
        dim: width of the encoder and of the context.
        layers: transformer encoder layers.
        heads: attention heads of the encoder (must divide ``dim``).
    """

    def __init__(
        self,
        names: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]],
                         Field(min_length=1, max_length=100_000)] = DIGIT_NAMES,
        template: Annotated[str, Field(min_length=2, max_length=1000)] = "a handwritten {}",
        tokens: Annotated[int, Field(ge=1, le=512)] = 8,
        dim: Annotated[int, Field(ge=1, le=2048)] = 64,
        layers: Annotated[int, Field(ge=1, le=24)] = 2,
        heads: Annotated[int, Field(ge=1, le=64)] = 4,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise OptionError("heads", f"a divisor of dim ({dim})", heads)
        captions = label_captions(template, names)
        self.names = list(names)
        self.template = template
        self.tokenizer = WordTokenizer([template.replace("{}", " "), *names], tokens)
        longest = max(captions, key=lambda c: len(self.tokenizer.ids(c)))
        needed = len(self.tokenizer.ids(longest))
        if needed > tokens:
            raise OptionError("tokens", f"at least {needed}: the caption {longest!r} needs the "
                              f"start token and {needed - 1} words (too short otherwise)", tokens)
        self.num_classes = len(names)
        self.tokens = tokens
        self.dim = dim
        # the captions of labels 0 .. num_classes - 1, then the null label's empty caption
        self.register_buffer("caption_ids", self.tokenizer.tokenize([*captions, ""]),
                             persistent=False)
        self.embedding = torch.nn.Embedding(len(self.tokenizer.vocabulary), dim)
        torch.nn.init.normal_(self.embedding.weight, std=0.02)
        self.positions = torch.nn.Parameter(0.02 * torch.randn(tokens, dim))
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0,
                                                 activation="gelu", batch_first=True,
                                                 norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """``(len(captions), tokens)`` long ids; unknown words -> ``<unk>``."""
        return self.tokenizer.tokenize(captions)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``(n, tokens)`` ids -> ``(n, tokens, dim)`` context."""
        x = self.embedding(ids) + self.positions[: ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=ids == self.tokenizer.pad_id)
        return self.norm(x)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """The context of free-text captions (what a ``--prompt`` would use)."""
        return self.encode_ids(self.tokenize(captions).to(self.caption_ids.device))

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        labels = self.labels(y, batch, device)
        if self.caption_ids.shape[0] <= batch:  # fewer captions than samples: encode each once
            return self.encode_ids(self.caption_ids)[labels]
        return self.encode_ids(self.caption_ids[labels])


__all__ = ["DIGIT_NAMES", "TextConditioner", "WordTokenizer", "label_captions"]
