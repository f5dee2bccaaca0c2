"""A restricted unpickler for the CIFAR python-pickle layout.

THIS IS THE ONLY PLACE NEUROFUSE UNPICKLES ANYTHING. The CIFAR-10/100 "python version" files
are pickles of plain dicts holding bytes, strings, ints, lists and NumPy arrays, so this reader
resolves exactly the globals those need (the builtins below and NumPy's array/dtype
reconstruction) and refuses every other global with :class:`UnsafePickleError`. A pickle that
names ``os.system``, ``subprocess.Popen``, ``builtins.eval`` or any other callable is rejected
before anything runs. Object arrays are refused too, so no arbitrary Python object can come out.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "safe_load_pickle"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list."""


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` (NumPy 2) or ``numpy.core.<submodule>.<name>`` (1.x)."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"this NumPy has no {submodule}.{name}")  # pragma: no cover


_BUILTINS = {
    name: getattr(__import__("builtins"), name)
    for name in ("dict", "list", "tuple", "bytes", "bytearray", "str", "int", "float")
}

# (module, name) -> loader of the allowed object. Arrays pickled by NumPy 1.x name
# ``numpy.core.*``, by NumPy 2 ``numpy._core.*``; protocol 5 uses ``_frombuffer``, protocol 2
# written by Python 3 encodes bytes with ``_codecs.encode``.
_ALLOWED: dict[tuple[str, str], Any] = {
    **{("builtins", n): (lambda obj=obj: obj) for n, obj in _BUILTINS.items()},
    **{("__builtin__", n): (lambda obj=obj: obj) for n, obj in _BUILTINS.items()},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
    **{
        (f"{package}.multiarray", "_reconstruct"): (
            lambda: _numpy_attr("multiarray", "_reconstruct")
        )
        for package in ("numpy.core", "numpy._core")
    },
    **{
        (f"{package}.numeric", "_frombuffer"): (lambda: _numpy_attr("numeric", "_frombuffer"))
        for package in ("numpy.core", "numpy._core")
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only the allow-listed globals above."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED.get((module, name))
        if resolve is None:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: CIFAR pickles only need plain "
                "containers and NumPy arrays. The file is corrupt or malicious; re-download "
                "the dataset from its official source"
            )
        return resolve()


def _check_no_objects(obj: Any, source: str) -> None:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise UnsafePickleError(f"{source}: object arrays are not allowed in a data file")
    if isinstance(obj, dict):
        for value in obj.values():
            _check_no_objects(value, source)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check_no_objects(value, source)


def safe_load_pickle(path: str | Path) -> Any:
    """Read one pickle file with the restricted unpickler (``encoding="bytes"`` for the
    Python-2 pickles that CIFAR ships; their string keys come back as ``bytes``).

    Raises :class:`UnsafePickleError` for a global outside the allow-list or an object
    array, and ``pickle.UnpicklingError`` for a file that is not a readable pickle; both
    messages start with the file's path."""
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    # a truncated or garbled file fails in any of these ways, depending on where
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError) as err:
        raise pickle.UnpicklingError(
            f"{path}: not a readable pickle ({err or type(err).__name__}); the file is "
            "truncated or corrupt"
        ) from err
    _check_no_objects(obj, str(path))
    return obj
