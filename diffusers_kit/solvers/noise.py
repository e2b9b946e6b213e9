"""Sources of the Gaussian draws a sampler makes: a torch generator, or per-sample streams.

:class:`GeneratorNoise` draws from one ``torch.Generator`` (the batch's draws depend on the batch).

:class:`PerSampleNoise` gives every sample its own stream from the counter-based generator
Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011): element ``e`` of draw ``k`` of sample ``i`` is a pure function of
``(seed, i, k, e)``, so sample ``i`` is the same whether it is drawn alone, in a batch of 64 or
in chunks of 7, on any device (docs/noise.md has the layout, the device argument and the cost).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch

Tensor = torch.Tensor

MASK32 = 0xFFFFFFFF

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32 round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments (golden ratio, sqrt(3) - 1)


def philox4x32(counter: tuple, key: tuple[int, int], rounds: int = 10,
               work: Tensor | None = None) -> tuple:
    """Philox4x32-``rounds`` of the 128-bit ``counter`` (four 32-bit words) under the 64-bit
    ``key`` (two words), Salmon et al. (2011), Random123's ``philox4x32_R``. One round is::

        hi0, lo0 = mulhilo(M0, c0);  hi1, lo1 = mulhilo(M1, c2)
        (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)

    and the key gains ``(W0, W1)`` (mod 2^32) between rounds. Words are Python integers in
    ``[0, 2^32)`` or int64 tensors holding such values (broadcast against each other): a product
    of two 32-bit words is below 2^64, and torch's int64 multiply wraps modulo 2^64, so its low
    word is ``p & MASK32`` and its high word ``(p >> 32) & MASK32`` (the arithmetic shift's sign
    bits are masked off). The key stays on the host, so its schedule costs no device work.

    The low words are kept unmasked between rounds: they only enter the next round through an
    XOR whose result is masked, so masking them there is the same. ``work``, an int64 tensor
    ``(6, *shape)`` of the broadcast shape, lets the rounds run in place once a word reaches
    that size (the words then live in ``work``): no allocation in the costly rounds.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    m0, m1 = PHILOX_M
    done = 0
    size = None if work is None else work[0].numel()
    while done < rounds and not (size and any(getattr(w, "numel", int)() == size
                                              for w in (c0, c1, c2, c3))):
        if done:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0
        done += 1
    if work is None or done == rounds:
        return c0, c1 & MASK32, c2, c3 & MASK32
    for slot, word in zip(work, (c0, c1, c2, c3), strict=False):  # full size: in place now
        slot.copy_(word) if isinstance(word, Tensor) else slot.fill_(word)
    c0, c1, c2, c3, t0, t1 = work
    for r in range(done, rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        torch.mul(c0, m0, out=t0)
        torch.mul(c2, m1, out=t1)
        torch.bitwise_right_shift(t1, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0)
        torch.bitwise_right_shift(t0, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1)
        c0.bitwise_and_(MASK32)
        c2.bitwise_and_(MASK32)
        c1, c3, t1, t0 = t1, t0, c1, c3  # the old low words' buffers take the next products
    return c0, c1.bitwise_and_(MASK32), c2, c3.bitwise_and_(MASK32)


def box_muller(words: tuple[Tensor, Tensor, Tensor, Tensor], work: Tensor | None = None,
               out: Tensor | None = None) -> Tensor:
    """Standard normals from four 32-bit words (Box & Muller 1958, "A note on the generation of
    random normal deviates"), both outputs kept: word pairs ``(a, b)`` = (0, 1) and (2, 3) give
    ``u = 1 - a / 2^32`` in ``(0, 1]``, ``theta = 2 pi b / 2^32`` and the two independent N(0, 1)
    draws ``r cos theta``, ``r sin theta`` with ``r = sqrt(-2 log u)``: lanes (0, 1) and (2, 3)
    of the float32 result ``(..., 4, n)`` for words ``(..., n)`` (written to ``out`` if given).
    ``work``, float64 ``(6, ..., n)``, holds the intermediates (else they are allocated).

    Computed in float64 (``log1p(-a / 2^32)`` of an exact argument, so ``r`` is at most
    ``sqrt(64 log 2) = 6.66``) and rounded once to float32: a last-bit difference between two
    libms' float64 log / cos / sin (CPU and CUDA) changes a float32 result only when the exact
    value lies within ~2^-29 (relative) of a float32 rounding boundary."""
    if work is None:
        radius, theta = torch.stack(words[0::2]).double(), torch.stack(words[1::2]).double()
    else:
        radius, theta = work[0:2], work[2:4]
        for slot, word in zip((radius[0], theta[0], radius[1], theta[1]), words, strict=True):
            slot.copy_(word)  # exact: words < 2^32
    radius.mul_(-1.0 / 2.0**32).log1p_().mul_(-2.0).sqrt_()
    theta.mul_(2.0 * math.pi / 2.0**32)
    if work is None:
        trig = torch.stack([theta.cos(), theta.sin()])
    else:
        torch.sin(theta, out=work[4:6])
        trig = work[2:6].unflatten(0, (2, 2))
        theta.cos_()
    trig = trig.movedim((0, 1), (-2, -3))  # (..., pair, cos / sin, n)
    radius = radius.movedim(0, -2).unsqueeze(-2)
    if out is None:
        return (trig * radius).float().flatten(-3, -2)
    torch.mul(trig, radius, out=out.unflatten(-2, (2, 2)))
    return out


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


def philox_normals(element: Tensor, group: Tensor, draws: Tensor, k0: Tensor, k1: Tensor
                   ) -> Tensor:
    """:func:`box_muller` of :func:`philox4x32` at counters ``(element, group, draws, 0)``
    (broadcast) under the key ``(k0, k1)`` (0-dim tensors): the float32 ``(..., 4, n)`` block
    :class:`PerSampleNoise` lays out, as one function for :func:`fused_draw` to compile."""
    words = torch.broadcast_tensors(*philox4x32((element, group, draws, 0), (k0, k1)))
    return box_muller(words)


@functools.cache
def fused_draw() -> Callable[..., Tensor]:
    """:func:`philox_normals` compiled by ``torch.compile`` (dynamic shapes; the key as tensors,
    so one compilation serves every seed, draw and size): the same numbers bit for bit, one
    kernel instead of ~100 element-wise passes. Compiling needs inductor's backend (a C++
    compiler on the CPU) and takes tens of seconds cold (docs/noise.md).
    :class:`PerSampleNoise` uses it when the environment sets ``DKIT_COMPILE_NOISE=1``."""
    return torch.compile(philox_normals, dynamic=True)


AHEAD_ELEMENTS = 1 << 16  # draws computed ahead hold at most this many numbers
LEAST_ELEMENTS = 1 << 12  # a computation fills at least this many numbers (below, it is
# all dispatch: 32 draws of (64, 2) cost what one does), the rest held for the next draws
CHUNK = 1 << 17  # a draw is computed in pieces of at most this many Philox counters


class PerSampleNoise(Noise):
    """Philox4x32-10 streams, one per sample: rows are samples ``first, first + 1, ...``.

    Element ``e`` (row-major within the sample) of draw ``k`` (the ``k``-th ``randn`` call) of
    sample ``i`` is lane ``i mod 4`` of :func:`box_muller` applied to the Philox4x32-10 output
    at counter ``(e, i // 4, k, 0)`` under key ``(seed mod 2^32, seed // 2^32 mod 2^32)``:
    one counter serves one element of four neighbouring samples, so a batch computes whole
    groups of four and keeps its rows. Up to 2^32 draws, 2^32 elements a sample, 2^34 samples.

    Equal-shape draws in sequence are computed several at a time (up to ``AHEAD_ELEMENTS``
    numbers), and a small draw is computed with the next ones of its shape up to
    ``LEAST_ELEMENTS`` numbers (it is otherwise all dispatch cost). Every number is the same
    either way: draw ``k`` is a function of ``k``, not of what was computed with it.

    Args:
        seed: the stream family (any integer; its low 64 bits matter).
        first: global index of the batch's first sample (a chunk starting at sample 56 passes 56).
    """

    def __init__(self, seed: int, first: int = 0) -> None:
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.first = int(first)
        self.draws = 0  # how many randn calls so far: the stream position, kept on the host
        self._ahead: tuple | None = None  # (signature, first draw held, draws (K, *shape), K)
        self._work: dict[tuple, tuple[Tensor, Tensor]] = {}  # see _buffers

    def randn(self, shape, *, device=None, dtype=torch.float32):  # type: ignore[no-untyped-def]
        shape = tuple(shape)
        device = _default_device() if device is None else torch.device(device)
        draw = self.draws
        self.draws += 1
        signature = (shape, device)
        ahead = self._ahead  # (signature, draw held first, held draws, how many were computed)
        same = ahead is not None and ahead[0] == signature
        if same and ahead[1] <= draw < ahead[1] + len(ahead[2]):  # computed: hand it over once
            z = ahead[2][draw - ahead[1]]
            self._ahead = (signature, draw + 1, ahead[2][draw - ahead[1] + 1:], ahead[3])
            return z if dtype == torch.float32 else z.to(dtype)
        size = max(1, math.prod(shape))
        count = max(1, LEAST_ELEMENTS // size)
        if same and draw == ahead[1]:  # equal shapes in sequence: compute ahead, 4x more each time
            count = max(count, min(4 * ahead[3], AHEAD_ELEMENTS // size))
        block = self._compute(shape, draw, count, device)
        self._ahead = (signature, draw + 1, block[1:], count)
        return block[0] if dtype == torch.float32 else block[0].to(dtype)

    def _compute(self, shape: tuple[int, ...], draw: int, count: int,
                 device: torch.device) -> Tensor:
        """Draws ``draw, ..., draw + count - 1`` of ``shape`` as float32 ``(count, *shape)``."""
        rows, size = shape[0], math.prod(shape[1:])
        lo, hi = self.first // 4, -(-(self.first + rows) // 4)  # the 4-sample groups
        if self.first < 0 or hi > 1 << 32 or draw + count > 1 << 32 or size > 1 << 32:
            raise ValueError(f"PerSampleNoise streams hold 2^34 samples, 2^32 draws and 2^32 "
                             f"elements a sample; given samples {self.first}.."
                             f"{self.first + rows - 1}, draw {draw + count - 1}, {size} elements")
        groups, key = hi - lo, (self.seed & MASK32, self.seed >> 32)
        z = torch.empty((count, groups, 4, size), dtype=torch.float32, device=device)
        fused = os.environ.get("DKIT_COMPILE_NOISE") == "1"
        draws = torch.arange(draw, draw + count, device=device,
                             dtype=torch.int64)[:, None, None] if count > 1 or fused else draw
        if fused:
            key = tuple(torch.tensor(k, device=device) for k in key)
        step_g = max(1, CHUNK // max(1, count * size))  # pieces bound the buffers' memory
        step_e = max(1, min(size, CHUNK // count))
        for g in range(0, groups, step_g):
            g_end = min(groups, g + step_g)
            group = torch.arange(lo + g, lo + g_end, device=device, dtype=torch.int64)[:, None]
            for e in range(0, size, step_e):
                e_end = min(size, e + step_e)
                element = torch.arange(e, e_end, device=device, dtype=torch.int64)
                if fused:
                    z[:, g:g_end, :, e:e_end] = fused_draw()(element, group, draws, *key)
                    continue
                work = self._buffers((count, g_end - g, e_end - e), device)
                words = philox4x32((element, group, draws, 0), key, work=work[0])
                box_muller(words, work[1], z[:, g:g_end, :, e:e_end])
        start = self.first - 4 * lo
        return z.reshape(count, 4 * groups, size)[:, start:start + rows].reshape((count, *shape))

    def _buffers(self, shape: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        """int64 and float64 ``(6, *shape)`` work buffers, kept for the next draw (the last two
        shapes: a draw's full chunks and its last one)."""
        key = (shape, device)
        if key not in self._work:
            if len(self._work) > 1:
                self._work.pop(next(iter(self._work)))
            self._work[key] = (torch.empty((6, *shape), dtype=torch.int64, device=device),
                               torch.empty((6, *shape), dtype=torch.float64, device=device))
        return self._work[key]


def _default_device() -> torch.device:
    """Where ``torch.randn(device=None)`` puts a tensor (``torch.get_default_device`` is
    torch >= 2.3; the project allows 2.2)."""
    get = getattr(torch, "get_default_device", None)
    return get() if get is not None else torch.empty(0).device


def as_noise(generator: torch.Generator | None = None, noise: Noise | None = None) -> Noise:
    """``noise`` if given, else draws from ``generator``."""
    return noise if noise is not None else GeneratorNoise(generator)
