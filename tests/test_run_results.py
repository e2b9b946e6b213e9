"""A run's results: typed fields that also read and write as the 0.2 mapping hooks used."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.run import Results


def test_fields_read_as_the_mapping_of_what_was_produced():
    results = Results(train_hash="abc", dependencies=[])
    results.train_loss = 0.5
    results["metrics"] = {"swd": 1.0}  # as 0.2's hooks and stages wrote it
    assert results.metrics == {"swd": 1.0}
    assert list(results) == ["train_hash", "dependencies", "train_loss", "metrics"]
    assert dict(results) == {"train_hash": "abc", "dependencies": [], "train_loss": 0.5,
                             "metrics": {"swd": 1.0}}
    assert "samples" not in results and results.get("samples") is None
    with pytest.raises(KeyError):
        results["samples"]
    results.samples = torch.zeros(2, 2)
    assert "samples" in results and results["samples"].shape == (2, 2)


def test_a_plugins_own_keys_are_kept_beside_the_fields():
    results = Results()
    results["my_plugin_score"] = 3
    assert results.extra == {"my_plugin_score": 3} and dict(results) == {"my_plugin_score": 3}
    del results["my_plugin_score"]
    results.nfe = 10
    del results["nfe"]
    assert results.nfe is None and len(results) == 0
