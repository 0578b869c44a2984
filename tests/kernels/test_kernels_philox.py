"""Philox4x32-10 of ddengine.kernels._step against the Random123 known-answer vectors and a pure-Python Philox."""

import random

import pytest

from ddengine.kernels import _step
from tests.support.kernel_oracle import philox_np, philox_py

# Random123 kat_vectors, "philox4x32 10" lines: counter[4], key[2] -> output[4].
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr, key, want", KAT)
def test_known_answers(ctr, key, want):
    assert _step.philox4x32_10(ctr, key) == want


@pytest.mark.parametrize("ctr, key, want", KAT)
def test_oracles_reproduce_known_answers(ctr, key, want):
    assert philox_py(ctr, key) == want
    assert tuple(int(v[0]) for v in philox_np(*([c] for c in ctr), *([k] for k in key))) == want


def test_random_inputs_match_pure_python():
    rng = random.Random(20111112)
    for _ in range(500):
        ctr = tuple(rng.getrandbits(32) for _ in range(4))
        key = tuple(rng.getrandbits(32) for _ in range(2))
        assert _step.philox4x32_10(ctr, key) == philox_py(ctr, key)


@pytest.mark.parametrize(
    "ctr, key, match",
    [
        ((0, 0, 0), (0, 0), "counter must be a sequence of 4"),
        ((0, 0, 0, 0), (0,), "key must be a sequence of 2"),
        ((0, 0, 0, 1 << 32), (0, 0), r"counter must be an int in \[0, 2\*\*32\), got 4294967296"),
        ((0, 0, 0, 0), (-1, 0), r"key must be an int in \[0, 2\*\*32\), got -1"),
    ],
)
def test_bad_arguments(ctr, key, match):
    with pytest.raises(ValueError, match=match):
        _step.philox4x32_10(ctr, key)
