"""Where a run may write: ``<output.root>/<name>/<timestamp>/`` and nowhere else.

Checked before anything is built or created, so that a bad location is a spec error naming
``output.root`` or ``name`` (exit status 2) rather than a traceback half-way through a run:
``~`` is expanded (the same way everywhere), ``..`` / separators / NUL bytes in the name are
refused, a root that is a file, not writable, or a path component too long for the file system
is refused, and the run folder itself is created race-free.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from diffusers_kit.run_folder import unique_folder
from diffusers_kit.spec.errors import SpecError, SpecIssue
from diffusers_kit.spec.loader import Document

MAX_NAME = 100  # characters of a run name (the spec's pattern says the same)
MAX_COMPONENT_BYTES = 255  # a folder name, on every common file system
MAX_PATH_BYTES = 4000  # PATH_MAX is 4096 on Linux; leave room for the files in the folder


def expand_root(root: str | Path) -> Path:
    """``output.root`` as a path: ``~`` and ``~user`` expanded, nothing else changed."""
    return Path(os.path.expanduser(str(root)))


def _name_problem(name: str) -> str | None:
    if not name:
        return "a non-empty run name"
    if "\x00" in name or "/" in name or "\\" in name:
        return "a run name without '/', '\\' or NUL bytes (it is one folder under output.root)"
    if name in (".", "..") or name.startswith("."):
        return "a run name that does not start with '.' ('..' would leave output.root)"
    if len(name) > MAX_NAME or len(name.encode()) > MAX_COMPONENT_BYTES:
        return f"a run name of at most {MAX_NAME} characters"
    return None


def _root_problem(root: str) -> str | None:
    if not root:
        return "a folder to write runs under (empty)"
    if "\x00" in root:
        return "a folder path without NUL bytes"
    path = expand_root(root)
    if str(path).startswith("~"):
        return "a folder; '~user' names no user here (write the path out)"
    if len(os.fsencode(str(path))) > MAX_PATH_BYTES:
        return f"a folder path of at most {MAX_PATH_BYTES} bytes"
    if any(len(os.fsencode(part)) > MAX_COMPONENT_BYTES for part in path.parts):
        return f"a folder path whose names have at most {MAX_COMPONENT_BYTES} bytes each"
    # the nearest part that exists decides: a file, or a folder this user cannot write into
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            return f"a folder ({probe} is a broken symbolic link)"
        probe = probe.parent
    if not probe.is_dir():
        where = "it is a file" if probe == path.absolute() else f"{probe} is a file"
        return f"a folder ({where})"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"a folder this user can write in ({probe} is not writable)"
    return None


def _group_problem(root: str, name: str) -> str | None:
    """A group folder ``<root>/<name>`` that is a symbolic link would take the run outside
    ``output.root`` while every message names a folder inside it."""
    if not name or _name_problem(name) or _root_problem(root):
        return None
    group = expand_root(root) / name
    if group.is_symlink():
        return (f"a run name whose folder lies inside output.root ({group} is a symbolic link "
                f"to {os.readlink(group)}; dkit writes nothing outside output.root: remove the "
                "link or point output.root there)")
    return None


def output_issues(root: str | Path, name: str, document: Document | None = None
                  ) -> list[SpecIssue]:
    """Every reason runs of ``name`` cannot be written under ``root`` (empty: they can)."""
    issues = []
    for path, problem, given in ((("name",), _name_problem(name), name),
                                 (("output", "root"), _root_problem(str(root)), str(root)),
                                 (("name",), _group_problem(str(root), name), name)):
        if problem is not None:
            line, origin = document.locate(path) if document else (None, None)
            issues.append(SpecIssue(path, problem, given, line, origin))
    return issues


def checked_root(root: str | Path, name: str, document: Document | None = None,
                 resume: str | Path | None = None) -> Path:
    """``root`` expanded, after :func:`output_issues` found nothing; raises SpecError.

    A resumed run writes into its own folder, so only the name is checked then."""
    issues = output_issues(root, name, document)
    if resume is not None:
        issues = [i for i in issues if i.path != ("output", "root")]
    if issues:
        raise SpecError(issues, document.origin if document else None)
    return expand_root(root)


def make_run_dir(root: str | Path, name: str) -> Path:
    """Create and return a new ``<root>/<name>/<timestamp>[-k]`` folder.

    ``mkdir`` without ``exist_ok`` is the test, so two runs started in the same second get
    different folders instead of one of them failing."""
    problem = _name_problem(name) or _group_problem(str(root), name)
    if problem is not None:
        raise SpecError([SpecIssue(("name",), problem, name)])
    return unique_folder(expand_root(root) / name, datetime.now().strftime("%Y%m%d-%H%M%S"))


__all__ = ["checked_root", "expand_root", "make_run_dir", "output_issues"]
