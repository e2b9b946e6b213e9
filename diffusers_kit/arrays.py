"""The one reader of every array input of dkit (``npz`` data, ``--images``, ``--init``,
``dkit evaluate --samples``, inpainting mask files): :class:`ArrayFile` reads a ``.npz`` or
``.npy`` file with ``allow_pickle=False`` and refuses truncated, structured, datetime, object,
empty and non-finite arrays with a message naming the file (issue 29). A leaf module, so that
components of every kind (data sets, forward models) read their files through it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # an archive with members, an empty one
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


class ArrayFileError(ValueError):
    """An array file that cannot be used; the message names the file (and the array)."""


class ArrayFile:
    """One ``.npz`` or ``.npy`` file of arrays: the one reader of every array input of dkit
    (``npz`` data, ``--images``, ``--init``, ``dkit evaluate --samples``, mask files).

    Nothing is unpickled (``allow_pickle=False``), and every array handed out by :meth:`array`
    is checked: a numeric dtype (bool, integer or float: no structured, datetime, object,
    string or complex arrays), at least one value, all finite. A file that is neither a zip
    archive nor a numpy array, a truncated or damaged one, or one whose header claims more
    memory than there is, is an :class:`ArrayFileError` naming the file, never numpy's
    advice to allow pickles. ``names``: the arrays of an ``.npz``, ``[]`` for a ``.npy``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.exists():
            raise FileNotFoundError(f"array file {self.path} does not exist (expected a .npz or "
                                    f".npy file; working directory {Path.cwd()})")
        if not self.path.is_file():
            raise IsADirectoryError(f"array file {self.path} is a folder, not a .npz or .npy "
                                    "file")
        with open(self.path, "rb") as handle:
            head = handle.read(6)
        self._npz: np.lib.npyio.NpzFile | None = None
        self._npy: np.ndarray | None = None
        if head.startswith(NPY_MAGIC):
            self._npy = self._guarded(lambda: np.load(self.path, allow_pickle=False), None)
            self.names: list[str] = []
        elif head[:4] in ZIP_MAGICS:
            self._npz = self._guarded(lambda: np.load(self.path, allow_pickle=False), None)
            self.names = list(self._npz.files)
        else:
            raise ArrayFileError(f"{self.path} is not a .npz or .npy file (it starts with "
                                 f"{head!r}, neither a zip archive nor a numpy array)")

    def _guarded(self, read, name):  # type: ignore[no-untyped-def]
        where = f"array {name!r} of {self.path}" if name is not None else str(self.path)
        try:
            return read()
        except MemoryError:
            raise ArrayFileError(f"{where} claims more memory than there is (its header says "
                                 "so; a damaged or foreign file?)") from None
        except ValueError as exc:
            if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
                raise ArrayFileError(f"{where} holds Python objects (dtype object), which dkit "
                                     "never unpickles: save a numeric array") from None
            raise ArrayFileError(f"{where} cannot be read ({exc})") from None
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            text = str(exc).strip() or type(exc).__name__
            raise ArrayFileError(f"{where} is truncated or damaged ({text})") from None

    def array(self, name: str | None = None) -> np.ndarray:
        """The array ``name`` of an ``.npz`` (the ``.npy`` array when None), checked."""
        if self._npy is not None:
            if name is not None:
                raise ArrayFileError(f"{self.path} holds a single array (.npy), not one named "
                                     f"{name!r}")
            array, where = self._npy, str(self.path)
        else:
            assert self._npz is not None
            if name not in self.names:
                raise ArrayFileError(f"{self.path} has no array {name!r}; its arrays are: "
                                     f"{', '.join(self.names) or 'none'}")
            array = self._guarded(lambda: self._npz[name], name)
            where = f"array {name!r} of {self.path}"
        return checked_array(array, where)

    def close(self) -> None:
        if self._npz is not None:
            self._npz.close()

    def __enter__(self) -> ArrayFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checked_array(array: np.ndarray, where: str) -> np.ndarray:
    """``array`` when it is numeric, non-empty and finite; else an :class:`ArrayFileError`
    naming ``where`` (the file and array it came from)."""
    dtype = array.dtype
    if dtype.names is not None:
        raise ArrayFileError(f"{where} is a structured array (fields {', '.join(dtype.names)}); "
                             "save a plain numeric array")
    if dtype.kind not in NUMERIC_KINDS:
        what = {"M": "dates (datetime64)", "m": "durations (timedelta64)",
                "O": "Python objects", "U": "text", "S": "bytes", "V": "raw bytes",
                "c": "complex numbers"}.get(dtype.kind, str(dtype))
        raise ArrayFileError(f"{where} holds {what} (dtype {dtype}); expected numbers (bool, "
                             "integer or float)")
    if array.size == 0:
        raise ArrayFileError(f"{where} is empty (shape {array.shape})")
    if dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            raise ArrayFileError(f"{where} holds {int(bad.sum())} NaN or infinite value(s): "
                                 "non-finite numbers")
    return array
