"""Every shipped spec validates and builds (components, data, network) without running."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusers_kit.graph import build_components
from diffusers_kit.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml")) + sorted(
    (ROOT / "plugins").glob("*/specs/*.yaml")
)


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_shipped_spec_builds(path):
    spec, document = load_spec(path, ["device=cpu"])
    components = build_components(spec, document)
    assert components.diffusion.network.parameter_count() > 0
    if components.solver is not None:  # a train-only spec (a feature network) has none
        assert components.solver.check(components.diffusion.process) is None
