"""A restricted unpickler for the pickled numpy arrays some datasets ship in (animal-mnist, CIFAR-10's python batches).

Only numpy's array reconstruction and plain containers are allowed, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import pickle

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def safe_loads(data: bytes, encoding: str = "ASCII"):
    return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
