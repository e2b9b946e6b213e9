"""Sources of the Gaussian draws a sampler makes: a torch generator, or per-sample streams.

:class:`GeneratorNoise` draws from one ``torch.Generator`` (the batch's draws depend on the batch).

:class:`PerSampleNoise` gives every sample its own stream: draw ``k`` of sample ``i`` (its global
index ``first + row``) is a pure function of ``(seed, i, k, element)``, so sample ``i`` is the
same whether it is drawn alone, in a batch of 64 or in chunks of 7, on any device. The stream is
counter-based (like Philox; Salmon et al. 2011): 32-bit integer hashing of the counter
(Wellons' "lowbias32" mixer, computed in int64 without overflow), then Box-Muller
(``z = sqrt(-2 log u1) cos(2 pi u2)``) on two independent 32-bit uniforms. Everything is batched
tensor arithmetic on the samples' device: no host synchronisation, no per-sample loop.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor | int, constant: int) -> Tensor | int:
    """``x * constant mod 2^32`` for ``x`` in ``[0, 2^32)`` held in int64, without overflow: the
    high and low 16-bit halves of ``x`` are multiplied separately (each product < 2^48)."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + ((high * (constant & 0xFFFF)) << 16)) & MASK32


def hash32(x: Tensor | int) -> Tensor | int:
    """Wellons' lowbias32 integer mixer on ``[0, 2^32)`` (a bijection; good avalanche), on int64
    tensors or Python integers alike."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class Noise:
    """A source of standard normal draws, ``randn(shape, device=...)``, one call per use."""

    def randn(self, shape: tuple[int, ...], *, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    def randn_like(self, x: Tensor) -> Tensor:
        """The draw ``randn(x.shape, device=x.device, dtype=x.dtype)`` (contiguous): what a
        sampler's loop adds to its state (a source may override it with a faster call that
        gives the same numbers)."""
        return self.randn(x.shape, device=x.device, dtype=x.dtype)

    @property
    def generator(self) -> torch.Generator | None:
        return None


class GeneratorNoise(Noise):
    """Draws from a ``torch.Generator`` (or torch's global one when ``None``)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self._generator = generator

    @property
    def generator(self) -> torch.Generator | None:
        return self._generator

    def randn(self, shape, *, device=None, dtype=torch.float32):  # type: ignore[no-untyped-def]
        if self._generator is None:  # torch's global generator (the same draws; ~1 us less)
            return torch.randn(shape, device=device, dtype=dtype)
        return torch.randn(shape, generator=self._generator, device=device, dtype=dtype)

    def randn_like(self, x):  # type: ignore[no-untyped-def]
        if self._generator is None:  # the same draws as randn(x.shape, ...); ~3 us less on
            # the CPU, where torch.randn's argument parsing outweighs a small draw
            return torch.randn_like(x, memory_format=torch.contiguous_format)
        return torch.randn(x.shape, generator=self._generator, device=x.device, dtype=x.dtype)


class PerSampleNoise(Noise):
    """Counter-based streams, one per sample: rows are samples ``first, first + 1, ...``.

    Args:
        seed: the stream family (any integer; only its low 32 bits matter).
        first: global index of the batch's first sample (a chunk starting at sample 56 passes 56).
    """

    def __init__(self, seed: int, first: int = 0) -> None:
        self.seed = int(seed) & MASK32
        self.first = int(first)
        self.draws = 0  # how many randn calls so far: the stream position, kept on the host

    def randn(self, shape, *, device=None, dtype=torch.float32):  # type: ignore[no-untyped-def]
        rows, size = shape[0], math.prod(shape[1:])
        key = _key(self.seed, self.draws)
        self.draws += 1
        index = torch.arange(self.first, self.first + rows, device=device, dtype=torch.int64)
        row_state = hash32(hash32(index) ^ key)[:, None]  # (rows, 1)
        element = torch.arange(size, device=device, dtype=torch.int64)
        salt = hash32(2 * element)[None, :], hash32(2 * element + 1)[None, :]
        u1 = (hash32(row_state ^ salt[0]).to(torch.float64) + 0.5) / 2.0**32  # (0, 1)
        u2 = hash32(row_state ^ salt[1]).to(torch.float64) / 2.0**32
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(dtype).reshape(shape)


def _key(seed: int, draw: int) -> int:
    """The stream key of draw ``draw``: a host integer (no device work, no synchronisation)."""
    return hash32(seed ^ hash32((draw * 0x9E3779B9 + 0x632BE5AB) & MASK32))


def as_noise(generator: torch.Generator | None = None, noise: Noise | None = None) -> Noise:
    """``noise`` if given, else draws from ``generator``."""
    return noise if noise is not None else GeneratorNoise(generator)
