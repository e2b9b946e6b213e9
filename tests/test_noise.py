"""Per-sample noise streams: Philox4x32-10 in torch, the Box-Muller transform and the layout.

* torch's int64 multiply wraps modulo 2^64, so a 32 x 32-bit product's words are exact;
* a plain-integer Philox (written here from the paper's round, any word width) reproduces
  numpy's ``Philox`` bit generator (Philox4x64-10, numpy's only Philox) and, at 32-bit width,
  the published Random123 known answers for philox4x32-10; the torch version equals it word for
  word on random and extreme counters and keys;
* ``PerSampleNoise`` element ``e`` of draw ``k`` of sample ``i`` is Box-Muller on the words at
  counter ``(e, i // 4, k, 0)`` (checked against scalar ``math``), whatever the batch, the
  chunking, the dtype or the look-ahead;
* the normals pass moment, Kolmogorov-Smirnov and correlation checks (between neighbouring
  samples, consecutive draws, neighbouring elements and seeds) that a deliberately broken
  variant (too few rounds, a draw left out of the counter) fails.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

from diffusers_kit.solvers import noise as noise_module
from diffusers_kit.solvers.noise import (
    MASK32,
    PerSampleNoise,
    box_muller,
    philox4x32,
)

CONSTANTS = {  # word width: (multipliers, Weyl key increments), Salmon et al. 2011, Table 2
    32: ((0xD2511F53, 0xCD9E8D57), (0x9E3779B9, 0xBB67AE85)),
    64: ((0xD2E7470EE14C6C93, 0xCA5A826395121157), (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)),
}


def philox_reference(counter, key, width, rounds=10):  # type: ignore[no-untyped-def]
    """Philox4xW-R on Python integers, straight from the round's definition (exact products)."""
    (m0, m1), (w0, w1) = CONSTANTS[width]
    mask = (1 << width) - 1
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = (p1 >> width) ^ c1 ^ k0, p1 & mask, (p0 >> width) ^ c3 ^ k1, p0 & mask
    return c0, c1, c2, c3


def test_int64_multiply_wraps_modulo_2_64():
    """The claim the torch Philox rests on: for 32-bit a, b the int64 product is a * b mod 2^64
    (two's complement), so ``p & MASK32`` and ``(p >> 32) & MASK32`` are its exact words, on
    the vectorised and the scalar loop alike."""
    rng = np.random.default_rng(0)
    a = [0, 1, 2**31, MASK32, *rng.integers(0, 2**32, 4000).tolist()]
    b = [MASK32, 2**31 + 1, MASK32, MASK32, *rng.integers(0, 2**32, 4000).tolist()]
    for lo, hi in ((0, len(a)), (2, 3), (3, 4)):  # long tensors and one-element ones
        p = torch.tensor(a[lo:hi], dtype=torch.int64) * torch.tensor(b[lo:hi], dtype=torch.int64)
        exact = [x * y for x, y in zip(a[lo:hi], b[lo:hi], strict=True)]
        assert (p & MASK32).tolist() == [e & MASK32 for e in exact]
        assert ((p >> 32) & MASK32).tolist() == [e >> 32 for e in exact]
    assert int((torch.tensor([MASK32]) * MASK32)[0]) < 0  # it did wrap past 2^63


def _increment(counter, width):  # type: ignore[no-untyped-def]
    value = sum(c << (width * i) for i, c in enumerate(counter)) + 1
    value &= (1 << 4 * width) - 1
    return [(value >> (width * i)) & ((1 << width) - 1) for i in range(4)]


def test_reference_matches_numpy_philox():
    """numpy's Philox (4x64-10) bumps its counter, then returns the four output words in order:
    ``Philox(counter=c, key=k).random_raw(4)`` is Philox(c + 1, k). The reference gives the
    same words on random and extreme counters and keys, and Random123's 4x64 known answer."""
    rng = np.random.default_rng(1)
    top = (1 << 64) - 1
    cases = [([top] * 4, [0, 0]), ([top] * 4, [top, top]), ([top, 0, top, 0], [5, 7])]
    cases += [(rng.integers(0, 2**64, 4, dtype=np.uint64).tolist(),
               rng.integers(0, 2**64, 2, dtype=np.uint64).tolist()) for _ in range(20)]
    for counter, key in cases:
        bits = np.random.Philox(counter=np.array(counter, dtype=np.uint64),
                                key=np.array(key, dtype=np.uint64))
        raw = bits.random_raw(8).tolist()
        first = _increment(counter, 64)
        assert raw[:4] == list(philox_reference(first, key, 64))
        assert raw[4:] == list(philox_reference(_increment(first, 64), key, 64))
    assert philox_reference([0] * 4, [0, 0], 64) == (
        0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B, 0x7E68B68AEC7BA23B)


KNOWN_4X32 = [  # Random123 kat_vectors, philox4x32 10 rounds: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_4X32)
def test_philox4x32_known_answers(counter, key, expected):
    assert philox_reference(counter, key, 32) == expected
    assert philox4x32(counter, key) == expected  # Python integers
    words = philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w[0]) for w in words) == expected


@pytest.mark.parametrize("in_place", [False, True])
def test_torch_philox_equals_the_reference(in_place):
    """Random and extreme counters and keys, broadcast as PerSampleNoise lays them out (a row
    vector, a column, a scalar): every word equals the plain-integer reference, with and
    without the in-place rounds."""
    rng = np.random.default_rng(2)
    row = torch.tensor([0, 1, MASK32, *rng.integers(0, 2**32, 9).tolist()])
    column = torch.tensor([0, MASK32, *rng.integers(0, 2**32, 5).tolist()])[:, None]
    for c2, c3, key in ((0, 0, (0, 0)), (MASK32, 7, (MASK32, MASK32)),
                        (123456789, MASK32, (0x9E3779B9, 42))):
        work = torch.empty((6, 7, 12), dtype=torch.int64) if in_place else None
        words = torch.stack(torch.broadcast_tensors(*philox4x32((row, column, c2, c3), key,
                                                                work=work)))
        for i in range(7):
            for j in range(12):
                expected = philox_reference((int(row[j]), int(column[i, 0]), c2, c3), key, 32)
                assert tuple(words[:, i, j].tolist()) == expected


def _normal(a: int, b: int) -> tuple[float, float]:
    r = math.sqrt(-2.0 * math.log1p(-a / 2.0**32))
    return r * math.cos(2 * math.pi * b / 2.0**32), r * math.sin(2 * math.pi * b / 2.0**32)


def test_stream_layout_and_box_muller():
    """Element e of draw k of sample i is lane i mod 4 of Box-Muller on the words at counter
    (e, i // 4, k, 0) under key (seed mod 2^32, seed >> 32), lanes (0, 1) from words (0, 1)
    and (2, 3) from words (2, 3); checked with scalar math (to float32 rounding)."""
    seed = 0x123456789ABC
    noise = PerSampleNoise(seed, first=5)
    draws = [noise.randn((6, 3)) for _ in range(3)]
    for k, z in enumerate(draws):
        for row in range(6):
            i = 5 + row
            for e in range(3):
                words = philox_reference((e, i // 4, k, 0), (seed & MASK32, seed >> 32), 32)
                pair = _normal(words[0], words[1]) + _normal(words[2], words[3])
                assert math.isclose(float(z[row, e]), pair[i % 4], rel_tol=1e-6, abs_tol=1e-7)
    # extreme words: u = 2^-32 gives the largest radius sqrt(64 log 2); u = 1 gives 0
    words = tuple(torch.tensor([[w]]) for w in (MASK32, 0, 0, 2**30))
    out = box_muller(words, torch.empty((6, 1, 1), dtype=torch.float64),
                     torch.empty((1, 4, 1)))
    assert out.flatten().tolist() == pytest.approx([math.sqrt(64 * math.log(2)), 0.0, 0.0, 0.0])


def test_a_sample_is_the_same_in_any_batch_dtype_and_order(monkeypatch):
    """One batch of 64, chunks of 7 (groups of four split), single rows, float64 and float16
    requests (the float32 numbers converted), draws interleaved with another shape (no
    look-ahead) and a draw computed in pieces of 8 counters give the same numbers for every
    sample."""
    whole = PerSampleNoise(seed=9)
    draws = [whole.randn((64, 2, 5)) for _ in range(5)]
    monkeypatch.setattr(noise_module, "CHUNK", 8)  # pieces split elements and groups
    pieces = PerSampleNoise(seed=9)
    for draw in draws:
        assert torch.equal(pieces.randn((64, 2, 5)), draw)
    monkeypatch.undo()
    short = PerSampleNoise(seed=9).randn((64, 3))  # a shorter sample: the first elements
    assert torch.equal(short, draws[0].reshape(64, 10)[:, :3])
    for first in range(0, 64, 7):
        rows = min(7, 64 - first)
        chunk = PerSampleNoise(seed=9, first=first)
        for draw in draws:
            assert torch.equal(chunk.randn((rows, 2, 5)), draw[first:first + rows])
    for i in (0, 3, 17, 63):
        alone = PerSampleNoise(seed=9, first=i)
        for draw in draws:
            assert torch.equal(alone.randn((1, 10), dtype=torch.float64),
                               draw[i].double().reshape(1, 10))
            alone.randn((2, 2))  # a draw of another shape between: k still counts calls
            alone.draws -= 1
    mixed = PerSampleNoise(seed=9)
    for draw in draws:
        assert torch.equal(mixed.randn((64, 2, 5), dtype=torch.float16), draw.half())
        mixed.randn((3,))
        mixed.draws -= 1


def test_look_ahead_hands_each_draw_over_once():
    """Draws computed ahead are the draws computed one at a time; stepping ``draws`` back gives
    fresh numbers even after the caller changed the tensor it was handed."""
    noise = PerSampleNoise(seed=4)
    ahead = [noise.randn((8, 4)) for _ in range(40)]
    for k in (0, 1, 2, 5, 17, 39):
        alone = PerSampleNoise(seed=4)
        alone.draws = k
        assert torch.equal(alone.randn((8, 4)), ahead[k])
    fresh = PerSampleNoise(seed=4)
    for _ in range(3):
        handed = fresh.randn((8, 4))  # draw 2 comes from the block computed at draw 1
    handed.zero_()
    fresh.draws = 2
    assert torch.equal(fresh.randn((8, 4)), ahead[2])


def test_out_of_range_streams_are_refused_and_empty_draws_are_empty():
    for shape in ((3, 0), (0, 5), (0,)):
        noise = PerSampleNoise(1, first=6)
        assert noise.randn(shape).shape == shape and noise.draws == 1
    with pytest.raises(ValueError, match="2\\^34 samples"):
        PerSampleNoise(1, first=-1).randn((2, 2))
    with pytest.raises(ValueError, match="2\\^34 samples"):
        PerSampleNoise(1, first=2**34 - 1).randn((2, 2))


# -- statistics -------------------------------------------------------------------------------

SAMPLES, ELEMENTS, DRAWS = 4096, 16, 4


def _normals(seed: int, rounds: int = 10, draw_in_counter: bool = True) -> torch.Tensor:
    """(draws, samples, elements) normals through PerSampleNoise's layout with a chosen number
    of rounds (10 is PerSampleNoise itself) or with the draw index left out of the counter."""
    groups = SAMPLES // 4
    out = torch.empty((DRAWS, groups, 4, ELEMENTS))
    for k in range(DRAWS):
        words = philox4x32((torch.arange(ELEMENTS), torch.arange(groups)[:, None],
                            k if draw_in_counter else 0, 0), (seed & MASK32, seed >> 32),
                           rounds=rounds)
        words = torch.broadcast_tensors(*map(torch.as_tensor, words))
        box_muller(words, torch.empty((6, groups, ELEMENTS), dtype=torch.float64), out[k])
    return out.reshape(DRAWS, SAMPLES, ELEMENTS).double()


def _failures(z: torch.Tensor, other_seed: torch.Tensor) -> list[str]:
    """The checks a standard normal i.i.d. array fails, each bound 6 standard errors (a
    correct generator fails one with probability ~2e-9; the seeds are fixed anyway)."""
    failed = []
    x = z.flatten()
    n = x.numel()
    for name, value, sd in (("mean", x.mean(), 1.0), ("variance", x.var() - 1, math.sqrt(2)),
                            ("skewness", (x**3).mean(), math.sqrt(15)),
                            ("kurtosis", (x**4).mean() - 3, math.sqrt(96))):
        if abs(float(value)) > 6 * sd / math.sqrt(n):
            failed.append(name)
    if stats.kstest(x.numpy(), "norm").pvalue < 1e-6:
        failed.append("KS")
    pairs = {"neighbouring samples": [(z[:, i::4], z[:, i + 1::4]) for i in range(3)]
             + [(z[:, 3:-1:4], z[:, 4::4])],
             "consecutive draws": [(z[:-1], z[1:])],
             "neighbouring elements": [(z[..., :-1], z[..., 1:])],
             "seeds": [(z, other_seed)]}
    for name, couples in pairs.items():
        for a, b in couples:
            for power in (1, 2):  # linear and squared-magnitude dependence
                r = torch.corrcoef(torch.stack([a.flatten() ** power, b.flatten() ** power]))
                if abs(float(r[0, 1])) > 6 / math.sqrt(a.numel()):
                    failed.append(f"{name} (power {power})")
    return failed


def test_normals_pass_the_checks():
    z = _normals(seed=3)
    noise = PerSampleNoise(3)
    assert torch.equal(torch.stack([noise.randn((SAMPLES, ELEMENTS)) for _ in range(DRAWS)]),
                       z.float())  # the construction is PerSampleNoise's
    assert _failures(z, _normals(seed=4)) == []
    assert _failures(_normals(seed=2**32 + 3), _normals(seed=3)) == []  # key's high word


@pytest.mark.parametrize("rounds", [1, 2, 3, 4, 5])
def test_broken_generators_fail_the_checks(rounds):
    """The checks are sharp enough to catch a gross break: Philox with 1 to 4 rounds fails the
    distribution, the neighbouring elements and the consecutive draws (5 rounds pass: the
    checks are no BigCrush); a counter without the draw index repeats every draw."""
    failed = _failures(_normals(3, rounds), _normals(4, rounds))
    if rounds <= 4:
        assert {"KS", "consecutive draws (power 1)", "neighbouring elements (power 1)"} <= set(
            failed)
    else:
        assert failed == []
    repeated = _failures(_normals(3, draw_in_counter=False), _normals(4, draw_in_counter=False))
    assert repeated == ["consecutive draws (power 1)", "consecutive draws (power 2)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws():
    """Integer Philox is exact on both; float64 log1p / cos / sin rounded to float32 agree
    except within ~2^-29 of a float32 rounding boundary (none among these 2^21 numbers)."""
    cpu = PerSampleNoise(11, first=3)
    cuda = PerSampleNoise(11, first=3)
    for _ in range(4):
        assert torch.equal(cpu.randn((4096, 128)), cuda.randn((4096, 128), device="cuda").cpu())


def _draws(seed: int, first: int, shape: tuple[int, ...], count: int = 5) -> list[torch.Tensor]:
    stream = PerSampleNoise(seed, first)
    return [stream.randn(shape) for _ in range(count)]


CASES = [(1, 0, (64, 2)), (2**40 + 7, 3, (9, 1, 8, 8)), (5, 6, (3, 0)), (11, 2, (4097, 2))]


def test_compiled_noise_path_lays_out_the_same_numbers(monkeypatch):
    """``DKIT_COMPILE_NOISE=1`` sends every piece through one call of ``fused_draw()`` (tensor
    key, the draws as a tensor even for one draw); here that call is the uncompiled
    ``philox_normals``, so the plumbing is checked without compiling: equal to the default
    path bit for bit (look-ahead, offsets, an empty draw, a draw in two pieces)."""
    expected = {case: _draws(*case) for case in CASES}
    monkeypatch.setenv("DKIT_COMPILE_NOISE", "1")
    monkeypatch.setattr(noise_module, "fused_draw", lambda: noise_module.philox_normals)
    monkeypatch.setattr(noise_module, "CHUNK", 1 << 12)  # (4097, 2): several pieces
    for case, draws in expected.items():
        got = _draws(*case)
        assert all(torch.equal(a, b) for a, b in zip(got, draws, strict=True)), case


@pytest.mark.skipif(os.environ.get("DKIT_TEST_COMPILE_NOISE") != "1",
                    reason="compiles with torch.compile (~45 s cold, needs a C++ compiler): "
                           "set DKIT_TEST_COMPILE_NOISE=1")
def test_compiled_noise_is_bit_equal_to_eager(monkeypatch):
    expected = {case: _draws(*case) for case in CASES}
    monkeypatch.setenv("DKIT_COMPILE_NOISE", "1")
    for case, draws in expected.items():
        got = _draws(*case)
        assert all(torch.equal(a, b) for a, b in zip(got, draws, strict=True)), case
