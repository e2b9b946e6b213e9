"""The built-in plugin: registers dkit's own kinds and components through ``dkit_register``.

It is announced in dkit's own ``diffusers_kit`` entry point, exactly like a third-party plugin.
Each component package lists what it contributes in its ``REGISTER`` table, so adding a
component is one new file plus one line in its package's ``__init__``.
"""

from __future__ import annotations

from diffusers_kit import (
    autoencoders,
    conditioners,
    data,
    forward_models,
    guidance,
    metrics,
    networks,
    objectives,
    optim,
    processes,
    solvers,
    tracking,
)
from diffusers_kit.hookspecs import hookimpl

# the trackers' life-cycle hooks (spec.track) are part of the built-in plugin
from diffusers_kit.tracking.hooks import (  # noqa: F401
    dkit_run_finished,
    dkit_run_started,
    dkit_samples_ready,
    dkit_train_step,
)

KINDS = {
    "data": (data.Dataset, "Data sets: training and held-out examples."),
    "process": (processes.NoiseProcess, "Noise processes: x_t = alpha(t) x_0 + sigma(t) eps."),
    "network": (networks.Network, "Networks that predict eps, the score, x0 or v from (x_t, t)."),
    "objective": (objectives.Objective, "Training objectives."),
    "solver": (solvers.Solver, "Samplers: SDE/ODE solvers and Markov chains."),
    "predictor": (solvers.Predictor, "Predictors of predictor-corrector sampling."),
    "corrector": (solvers.Corrector, "Correctors of predictor-corrector sampling."),
    "guidance": (guidance.Guidance, "Guidance terms added to the model's prediction when "
                 "sampling: classifier-free, classifier, measurement terms."),
    "forward_model": (forward_models.ForwardModel, "Measurement operators y = A(x) + noise for "
                      "inverse problems."),
    "metric": (metrics.Metric, "Sample-quality metrics."),
    "autoencoder": (autoencoders.Autoencoder, "First stages of latent diffusion: image <-> "
                    "latent, with the latent scale factor applied automatically."),
    "conditioner": (conditioners.Conditioner, "Context sequences (class tokens, text) that "
                    "networks attend to through cross-attention."),
    "optimizer": (optim.Optimizer, "Optimizers."),
    "tracker": (tracking.Tracker, "Experiment trackers (spec.track): TensorBoard, MLflow."),
}

PACKAGES = (data, processes, networks, objectives, solvers, guidance, forward_models, metrics,
            optim, autoencoders, conditioners, tracking)


@hookimpl
def dkit_register(registry) -> None:  # type: ignore[no-untyped-def]
    for name, (base, doc) in KINDS.items():
        registry.add_kind(name, base, doc)
    for package in PACKAGES:
        for kind, name, factory in package.REGISTER:
            registry.add(kind, name, factory)
