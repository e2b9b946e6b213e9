"""The ``dkit`` command line. Each subcommand lives in its own module with ``register``."""

from diffusers_kit.cli.main import main

__all__ = ["main"]
