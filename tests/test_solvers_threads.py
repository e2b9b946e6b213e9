"""The CLI's thread policy (diffusers_kit.threads): explicit wins, then OMP_NUM_THREADS, then the
free cores; never fewer than one."""

from __future__ import annotations

import pytest

from diffusers_kit.threads import choose_threads


def test_free_cores_by_default():
    assert choose_threads("auto", environ={}, cores=2, load=0.1) == 2
    assert choose_threads("auto", environ={}, cores=2, load=1.0) == 1  # one competitor
    assert choose_threads(None, environ={}, cores=8, load=3.4) == 5
    assert choose_threads("auto", environ={}, cores=2, load=6.0) == 1  # never below one


def test_explicit_and_environment_win():
    assert choose_threads(3, environ={"OMP_NUM_THREADS": "1"}, cores=2, load=0.0) == 3
    assert choose_threads("2", environ={}, cores=8, load=7.0) == 2
    assert choose_threads("auto", environ={"OMP_NUM_THREADS": "4"}, cores=2, load=2.0) == 4
    with pytest.raises(ValueError, match="at least 1"):
        choose_threads(0)
