"""torch-fidelity's Inception module, importable without torchvision.

torch-fidelity's package ``__init__`` imports torchvision (for its data sets and its CLIP and
DINOv2 extractors), which requires another torch build; its FID Inception network needs torch
alone. Installed with ``pip install --no-deps torch-fidelity``, the package then fails to import,
and so does torchmetrics' image package, which imports torch-fidelity's Inception module whenever
torch-fidelity is installed (dkit's ``fd`` / ``kid`` use torchmetrics' estimators). So when the
plain import fails, the package is registered as a bare package object (its ``__init__`` not
run) under which its modules import normally; ``import torch_fidelity`` then gives that bare
package, whose submodules work and whose top-level names (which need torchvision) are absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

INCEPTION = "torch_fidelity.feature_extractor_inceptionv3"


def inception_module() -> ModuleType | None:
    """torch-fidelity's Inception module, or None when torch-fidelity is not installed."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return None
    try:
        return importlib.import_module(INCEPTION)
    except ImportError:
        pass  # torchvision, imported by the package's other modules
    sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)  # __init__ not run
    return importlib.import_module(INCEPTION)


def torchmetrics_image(name: str) -> ModuleType:
    """``torchmetrics.image.<name>``, after making torch-fidelity importable (module
    docstring)."""
    return torchmetrics_module(f"image.{name}")


def torchmetrics_module(name: str) -> ModuleType:
    """``torchmetrics.<name>``, after making torch-fidelity importable: torchmetrics' top-level
    ``__init__`` imports its image package, so every torchmetrics import goes through here."""
    inception_module()
    return importlib.import_module(f"torchmetrics.{name}")
