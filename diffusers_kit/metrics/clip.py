"""CLIP score of text-conditioned samples, from a local Hugging Face CLIP folder.

The CLIP score (Hessel et al. 2021) of an image ``x`` and its caption ``c`` is the cosine
similarity of their CLIP embeddings, clipped at 0; this is torchmetrics' ``CLIPScore`` form
(weight 100, where Hessel et al. use 2.5):

    CLIPScore(x, c) = 100 max(cos(E_I(x), E_T(c)), 0)

dkit's text conditioning gives each class label a caption (``template`` with ``{}`` replaced by
the class's name, as the ``text`` conditioner does), so each class-conditional sample is scored
against the caption of the class it was asked for. The figure is the mean over samples with the
bootstrap interval of the mean, beside its floor: the held-out images scored against their own
labels' captions (what a perfect generator would get). Images go from the data range
``[low, high]`` to 8-bit RGB (:func:`~diffusers_kit.metrics.inception.to_uint8`), then through
the folder's own image processor (resize, crop, normalisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import Field

from diffusers_kit.conditioners.text import DIGIT_NAMES, label_captions
from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.base import Metric
from diffusers_kit.metrics.floor import ErrorBars, Level, Resamples, mean_with_interval
from diffusers_kit.metrics.inception import to_uint8
from diffusers_kit.metrics.restoration import DataValue

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel

BATCH = 64


def clip_scores(cosines: torch.Tensor) -> torch.Tensor:
    """``100 max(cos, 0)`` of the image-caption cosine similarities (module docstring)."""
    return 100 * cosines.clamp(min=0)


def _tensor(output: Any) -> torch.Tensor:
    # get_*_features return the projected embeddings (a tensor, or an output whose
    # pooler_output they are, depending on the transformers version)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScore(Metric):
    """CLIP score of class-conditional samples with their class's caption (``clip_score``,
    ``clip_score_floor`` on held-out images, intervals, ``clip_score_n``).

    Args:
        path: a local Hugging Face folder with a CLIP model, its tokenizer and image processor
            (``save_pretrained`` of ``CLIPModel``, tokenizer and ``CLIPImageProcessor``).
        template: the caption of a class, ``{}`` standing for its name.
        names: the class names (null: the digits' names, "zero" .. "nine").
        low: the lowest value of the data range (mapped to 0 of an 8-bit image).
        high: the highest value of the data range (mapped to 255).
        resamples: bootstrap resamples for the interval of the mean (0: none).
        level: confidence level of the interval.
    """

    name = "clip_score"
    uses_labels = True

    def __init__(self, path: Annotated[str, Field(min_length=1)],
                 template: str = "a handwritten {}", names: list[str] | None = None,
                 low: DataValue = -1.0, high: DataValue = 1.0, resamples: Resamples = 1000,
                 level: Level = 0.95) -> None:
        if high <= low:
            raise ValueError(f"high ({high}) must exceed low ({low})")
        self.captions = label_captions(template, names or DIGIT_NAMES)
        self.low, self.high = low, high
        self.bars = ErrorBars(resamples, level)
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(f"path: {folder} is not a Hugging Face model folder (no "
                             f"config.json); expected the save_pretrained folder of a CLIP model "
                             f"with its tokenizer and image processor")
        import transformers

        try:
            self.model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder,
                                                                        local_files_only=True)
            self.processor = transformers.AutoImageProcessor.from_pretrained(
                folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"path: {folder} does not hold a CLIP model, tokenizer and image "
                             f"processor ({type(error).__name__}: {error})") from error
        self.model.eval()

    def score(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The CLIP score of each image ``x[i]`` with the caption of ``labels[i]``."""
        return clip_scores(self.cosines(x, labels))

    @torch.no_grad()
    def cosines(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cos(E_I(x[i]), E_T(caption of labels[i]))`` for each image, float64."""
        labels = labels.long().cpu().flatten()
        if len(labels) != len(x):
            raise ValueError(f"{len(labels)} labels for {len(x)} samples")
        if int(labels.max()) >= len(self.captions) or int(labels.min()) < 0:
            raise ValueError(f"labels must lie in 0 .. {len(self.captions) - 1} (one caption "
                             f"per name); got {int(labels.min())} .. {int(labels.max())}")
        images = to_uint8(x.detach().cpu(), self.low, self.high)
        out = []
        for start in range(0, len(images), BATCH):
            chunk = images[start:start + BATCH]
            pixels = self.processor(images=list(chunk), input_data_format="channels_first",
                                    return_tensors="pt")["pixel_values"]
            captions = [self.captions[c] for c in labels[start:start + BATCH].tolist()]
            tokens = self.tokenizer(captions, padding=True, return_tensors="pt")
            image = _tensor(self.model.get_image_features(pixel_values=pixels))
            text = _tensor(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                        attention_mask=tokens["attention_mask"]))
            out.append(torch.nn.functional.cosine_similarity(image.double(), text.double(),
                                                             dim=1))
        return torch.cat(out)

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None, labels: torch.Tensor | None = None
                 ) -> dict[str, float]:
        if labels is None:
            raise ValueError("clip_score judges class-conditional samples: the run must sample "
                             "with labels (a text- or class-conditional model)")
        if data.heldout_labels is None:
            raise ValueError("clip_score needs a data set with class labels (for its floor)")
        out = mean_with_interval(self.name, self.score(samples, labels), generator, self.bars)
        real = mean_with_interval(self.name, self.score(data.heldout, data.heldout_labels),
                                  generator, self.bars)
        return {self.name: out[self.name], f"{self.name}_floor": real[self.name],
                f"{self.name}_low": out[f"{self.name}_low"],
                f"{self.name}_high": out[f"{self.name}_high"],
                f"{self.name}_floor_low": real[f"{self.name}_low"],
                f"{self.name}_floor_high": real[f"{self.name}_high"],
                f"{self.name}_std": out[f"{self.name}_std"],
                f"{self.name}_n": out[f"{self.name}_n"]}


__all__ = ["CLIPScore", "clip_scores"]
