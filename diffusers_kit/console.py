"""The one place that makes the rich consoles dkit prints through.

On a terminal rich uses the terminal's width. When the output is not a terminal (``dkit plugins
| cat``, ``dkit run SPEC | tee log``, a CI log) rich falls back to 80 columns, which squeezes
tables into narrow columns and breaks names and numbers over several lines. A console made
here uses ``COLUMNS`` when it is set (rich reads it) and otherwise :data:`PIPED_WIDTH`, wide
enough for every built-in table row on one line.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

#: The width of piped output when ``COLUMNS`` is not set.
PIPED_WIDTH = 200


def make_console(*, stderr: bool = False, **options: Any) -> Console:
    """A :class:`rich.console.Console` (``stderr`` and ``options`` as rich takes them) whose
    width, when it does not write to a terminal, is ``COLUMNS`` or :data:`PIPED_WIDTH`
    instead of rich's 80. An explicit ``width`` is kept; a terminal or a notebook keeps its
    own width."""
    console = Console(stderr=stderr, **options)
    if ("width" not in options and not console.is_terminal and not console.is_jupyter
            and not os.environ.get("COLUMNS", "").strip().isdigit()):
        console.width = PIPED_WIDTH
    return console
