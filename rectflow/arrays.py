"""The check every data array passes, loaded or generated, and the error that names bad data.

Kept apart from :mod:`rectflow.data` (sets and loaders) and :mod:`rectflow.tables` (Parquet, splits,
versions) so that both import it and neither imports the other.
"""

from __future__ import annotations

import numpy as np

from rectflow.errors import InputError

__all__ = ["F32_MAX", "DataError", "check_array"]


class DataError(InputError, ValueError):
    """Bad data: the message names the file or data set and what was expected."""


F32_MAX = float(np.finfo(np.float32).max)


def check_array(x: np.ndarray, where: str, generated: bool = False, row0: int = 0) -> np.ndarray:
    """``x`` as float32 ``(n, d)`` or ``(n, c, h, w)`` if it is a non-empty numeric array whose
    values are finite and fit in float32; else :class:`DataError` naming ``where`` and the first
    bad row. Loaded files and generated sets go through this same check; ``generated`` words the
    message for a set that was drawn (``where`` then names the setting, e.g. ``data.noise``). ``row0``:
    the row number of ``x[0]`` in the file (a block of a file read in blocks)."""
    if x.dtype.kind not in "fiub":
        raise DataError(f"{where}: expected a numeric array, got dtype {x.dtype}")
    if x.ndim not in (2, 4):
        raise DataError(f"{where}: expected shape (n, d) or (n, c, h, w), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.size == 0:
        raise DataError(f"{where}: is empty")
    if x.dtype.kind == "f":
        with np.errstate(all="ignore"):  # no numpy warning on stderr: the message below says it
            rows = x.reshape(len(x), -1)
            finite = np.isfinite(rows).all(1)
            big = ~finite | (np.abs(rows) > F32_MAX).any(1) if x.dtype.itemsize > 4 else ~finite
            if big.any():
                first = int(big.argmax()) + row0
                if generated:
                    top = float(np.nanmax(np.abs(rows))) if not np.isnan(rows).all() else float("nan")
                    raise DataError(f"{where} overflow float32 (|x| up to {top:.3g}, first in row {first}; "
                                    f"float32 holds at most {F32_MAX:.3g})")
                if not finite.all():
                    raise DataError(f"{where}: contains NaN or infinite values (first in row {int((~finite).argmax()) + row0})")
                top = float(np.abs(rows).max())
                raise DataError(f"{where}: has values too large for float32 (|x| up to {top:.3g}, first in row "
                                f"{first}; float32 holds at most {F32_MAX:.3g})")
    return x.astype(np.float32, copy=False)
