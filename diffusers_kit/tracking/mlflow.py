"""MLflow runs: parameters = the resolved spec, metrics, artifacts = the run folder's files
(needs ``mlflow-skinny`` or ``mlflow``: ``pip install diffusers_kit[mlflow]``).

The tracking URI is the ``tracking_uri`` parameter, else ``MLFLOW_TRACKING_URI``, else a local
file store ``<output.root>/mlruns``. MLflow 3 refuses a file store unless
``MLFLOW_ALLOW_FILE_STORE`` is set; this tracker sets it (when unset) for ``file:`` URIs only,
the one place it writes to. ``mlflow ui --backend-store-uri <uri>`` shows the runs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from diffusers_kit.tracking.base import Tracker, missing_extra

#: MLflow's limit on a parameter's value, in characters
PARAM_LIMIT = 6000


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested spec as MLflow parameters: ``{"train.optimizer.lr": "0.001", ...}``; list items
    are numbered (``evaluate.metrics.0.kind``); values longer than MLflow allows are cut."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list) and value:
        items = [(str(i), item) for i, item in enumerate(value)]
    else:
        return {prefix: str(value)[:PARAM_LIMIT]} if prefix else {}
    out: dict[str, str] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


class MLflow(Tracker):
    """Log the run to MLflow.

    Args:
        tracking_uri: where to log (``file:/path``, ``http://host:5000``, ...); default
            ``MLFLOW_TRACKING_URI`` or ``file:<output.root>/mlruns``.
        experiment: the experiment's name (default: the spec's ``name``).
        artifacts: upload the run folder's files as the run's artifacts at the end.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None,
                 artifacts: bool = True) -> None:
        missing_extra("mlflow", "mlflow", "mlflow")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifacts = artifacts
        self.client: Any = None
        self.run_id: str | None = None

    def uri(self, run: Any) -> str:
        """The tracking URI used for ``run``."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if not uri:
            uri = (Path(run.spec.output.root).expanduser().resolve() / "mlruns").as_uri()
        return uri

    def start(self, run: Any) -> None:
        from mlflow import MlflowClient

        uri = self.uri(run)
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = self.experiment or run.spec.name
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        created = self.client.create_run(experiment, run_name=run.dir.name,
                                         tags={"dkit.run_dir": str(run.dir.resolve())})
        self.run_id = created.info.run_id
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in
                  flatten(run.components.resolved).items()]
        for first in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[first:first + 100])

    def train_step(self, run: Any, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if math.isfinite(value):
                self.client.log_metric(self.run_id, f"train_{name}", value, step=step)

    def finish(self, run: Any, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.client.log_metric(self.run_id, name, float(value), step=step)
        if self.artifacts:
            self.client.log_artifacts(self.run_id, str(run.dir))
        self.client.set_terminated(self.run_id)
