"""Fréchet Inception distance and KID with the standard Inception features, as papers report them.

FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) are computed in the 2048-wide pool layer
of the InceptionV3 network of the TensorFlow FID code (weights ``pt_inception-2015-12-05``), in
torch-fidelity's port (``FeatureExtractorInceptionV3``, the network torchmetrics'
``FrechetInceptionDistance`` also uses). The protocol, so that figures compare with papers:

- samples and data are mapped from the data range ``[low, high]`` to 8-bit images,
  ``round(255 (x - low) / (high - low))`` clamped to ``[0, 255]``; one channel (digits) is
  repeated to three;
- the network resizes them to 299 x 299 with TensorFlow 1's bilinear resize and scales them
  to ``(x - 128) / 128`` (torch-fidelity's forward, bit-exact with the TensorFlow reference);
- the statistic is that of :mod:`~diffusers_kit.metrics.fd` / :mod:`~diffusers_kit.metrics.kid`
  on those features: n = min(samples, held-out, train) samples against the first n held-out
  examples of the run's data, beside the floor (n training examples against the same held-out
  ones) and with the interval of :mod:`~diffusers_kit.metrics.floor`. Papers usually report
  n = 50,000 against the training set; a figure at another n is not comparable with theirs
  (FID is biased upwards at finite n).

Weights are a local file (``weights:``, a PyTorch state dict read with ``weights_only``: no
code runs), else torch-fidelity's cached download (``$TORCH_HOME/hub/checkpoints``), else
downloaded there when the network is reachable; without any: a ValueError saying how to
provide the file.

torch-fidelity is installed with ``pip install --no-deps torch-fidelity``: its package imports
torchvision (for its data sets and other networks), which pulls another torch build; the
Inception network needs torch alone, so its module is imported without the package's
``__init__`` when torchvision is missing (:mod:`diffusers_kit.metrics.fidelity`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import Field

from diffusers_kit.data.base import DataSplits
from diffusers_kit.metrics.fd import FrechetDistance
from diffusers_kit.metrics.fidelity import inception_module
from diffusers_kit.metrics.floor import ErrorBars, Level, RealSets, Resamples, real_sets
from diffusers_kit.metrics.kid import KernelDistance
from diffusers_kit.metrics.restoration import DataValue

if TYPE_CHECKING:
    from diffusers_kit.model import ScoreModel

# torch-fidelity's release of the FID Inception weights (converted from TensorFlow's)
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]
FEATURES = "2048"
INSTALL = ("torch-fidelity, which defines the FID Inception network: "
           "pip install --no-deps 'torch-fidelity>=0.3'")
BATCH = 64


def inception_class() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (imported without torchvision:
    :mod:`diffusers_kit.metrics.fidelity`); a ValueError saying how to install it."""
    module = inception_module()
    if module is None:
        raise ValueError(f"the Inception metrics need {INSTALL}")
    return module.FeatureExtractorInceptionV3  # type: ignore[no-any-return]


def _download(url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=False)


def weights_file(weights: str | Path | None) -> Path:
    """The weights file to load: ``weights`` when given (it must exist), else torch-fidelity's
    cached download, else that download now; a ValueError naming the ways to provide it."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ValueError(f"weights: no file {path} (the FID Inception weights, "
                             f"{WEIGHTS_FILE}, from {WEIGHTS_URL})")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if cached.is_file():
        return cached
    try:
        _download(WEIGHTS_URL, cached)
    except Exception as error:  # offline, proxy, disk: all mean the same to the user
        raise ValueError(
            f"the FID Inception weights are not on this machine and could not be downloaded "
            f"({type(error).__name__}: {error}). Download {WEIGHTS_URL} where the internet is "
            f"reachable and either give its path as the metric's 'weights:' or put it at "
            f"{cached}") from error
    return cached


def load_inception(path: Path) -> torch.nn.Module:
    """The FID Inception network with the state dict in ``path``, returning the 2048 pool
    features. The file is first read with ``weights_only=True``, so a file that would run code
    when unpickled is refused before torch-fidelity reads it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"weights: {path} is not a PyTorch state dict of tensors "
                         f"({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights: {path} is not a state dict (name -> tensor)")
    network_class = inception_class()
    try:
        return network_class("inception-v3-compat", [FEATURES],  # type: ignore[no-any-return]
                             feature_extractor_weights_path=str(path))
    except RuntimeError as error:  # load_state_dict: missing keys or shapes
        raise ValueError(f"weights: {path} does not hold the FID Inception network's weights "
                         f"({str(error).splitlines()[0]})") from error


def to_uint8(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Images ``(n, C, H, W)`` in ``[low, high]`` as 8-bit RGB: ``round(255 (x - low) / (high -
    low))`` clamped to ``[0, 255]``, one channel repeated to three."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"the Inception metrics need images with 1 or 3 channels, "
                         f"(n, C, H, W); got shape {tuple(x.shape)}")
    scaled = ((x.double() - low) / (high - low) * 255).round().clamp(0, 255).to(torch.uint8)
    return scaled.expand(-1, 3, -1, -1) if scaled.shape[1] == 1 else scaled


class InceptionSpace:
    """The FID Inception features of images in ``[low, high]`` (module docstring)."""

    def __init__(self, weights: str | None, low: float, high: float) -> None:
        if high <= low:
            raise ValueError(f"high ({high}) must exceed low ({low})")
        self.path = weights_file(weights)
        inception_class()  # the missing package is named now, not at evaluation
        self.low, self.high = low, high
        self._network: torch.nn.Module | None = None

    def network(self) -> torch.nn.Module:
        if self._network is None:
            self._network = load_inception(self.path)
        return self._network

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 2048)`` pool features, float64 on the CPU."""
        network = self.network()
        images = to_uint8(x.detach().cpu(), self.low, self.high)
        out = [network(images[i:i + BATCH])[0].double() for i in range(0, len(images), BATCH)]
        return torch.cat(out)

    def embedded_sets(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator
                      ) -> tuple[RealSets, torch.Tensor, torch.Tensor, torch.Tensor]:
        sets = real_sets(samples, data, generator)
        fake, reference, real = (self.embed(x) for x in (sets.samples, sets.reference, sets.real))
        return sets, fake, reference, real


Weights = Annotated[str, Field(min_length=1)] | None


class _InInceptionSpace:
    """What both Inception metrics share: their sets are embedded by ``self.space`` (an
    :class:`InceptionSpace`), and the base metric's keys (``fd...``, ``kid...``) are reported
    under this metric's name (``fid_inception...``, ``kid_inception...``)."""

    name: str
    base_key: str
    space: Any

    def embedded_sets(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator
                      ) -> tuple[RealSets, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.space.embedded_sets(samples, data, generator)  # type: ignore[no-any-return]

    def evaluate(self, samples: torch.Tensor, data: DataSplits, generator: torch.Generator,
                 model: ScoreModel | None = None) -> dict[str, float]:
        out = super().evaluate(samples, data, generator, model)  # type: ignore[misc]
        return {key.replace(self.base_key, self.name, 1): value for key, value in out.items()}


class InceptionFrechetDistance(_InInceptionSpace, FrechetDistance):
    """FID: the Fréchet distance in the FID Inception network's pool features, beside its floor
    and with its interval (``fid_inception``, ``fid_inception_floor``, ... ; protocol in
    :mod:`diffusers_kit.metrics.inception`).

    Args:
        weights: path of the FID Inception weights (``weights-inception-2015-12-05-6726825d.pth``;
            null: torch-fidelity's cached or downloaded copy).
        low: the lowest value of the data range (mapped to 0 of an 8-bit image).
        high: the highest value of the data range (mapped to 255).
        resamples: resampling draws for the intervals (0: none).
        level: confidence level of the intervals.
    """

    name = "fid_inception"
    base_key = "fd"

    def __init__(self, weights: Weights = None, low: DataValue = -1.0, high: DataValue = 1.0,
                 resamples: Resamples = 100, level: Level = 0.95) -> None:
        self.space: Any = InceptionSpace(weights, low, high)
        self.bars = ErrorBars(resamples, level)



class InceptionKernelDistance(_InInceptionSpace, KernelDistance):
    """KID in the FID Inception network's pool features, beside its floor (``kid_inception``,
    ``kid_inception_std`` over subsets, ``kid_inception_floor``, ...).

    Args:
        weights: path of the FID Inception weights (null: torch-fidelity's cached or downloaded
            copy).
        low: the lowest value of the data range.
        high: the highest value of the data range.
        subsets: random subsets the estimate is averaged over.
        subset_size: examples per subset (null: half of the compared sets' size; 1000 in
            Bińkowski et al.).
        resamples: resampling draws for the intervals (0: none).
        level: confidence level of the intervals.
    """

    name = "kid_inception"
    base_key = "kid"

    def __init__(self, weights: Weights = None, low: DataValue = -1.0, high: DataValue = 1.0,
                 subsets: Annotated[int, Field(ge=1, le=10_000)] = 100,
                 subset_size: Annotated[int, Field(ge=2, le=1_000_000)] | None = None,
                 resamples: Resamples = 100, level: Level = 0.95) -> None:
        self.space: Any = InceptionSpace(weights, low, high)
        self.bars = ErrorBars(resamples, level)
        self.subsets = subsets
        self.subset_size = subset_size



__all__ = ["InceptionFrechetDistance", "InceptionKernelDistance", "InceptionSpace",
           "inception_class", "load_inception", "to_uint8", "weights_file"]
