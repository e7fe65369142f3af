"""Machine-local settings: the ``RECTFLOW_*`` environment variables, typed and validated once.

These say how this machine runs the pipeline (threads, waits, device, a Dask cluster), never what
the pipeline computes nor where its data goes: that is ``params.yaml``'s job, which DVC versions.
(``storage`` is chosen by ``storage.backend`` alone; ``RECTFLOW_S3_*`` only fill in S3 settings,
:class:`rectflow.storage.StorageSettings`.) The README's "Settings" table lists every variable.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rectflow.config import ParamsError

__all__ = ["Settings", "settings"]

Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600, allow_inf_nan=False)]  # a week at most: every wait bounded


class Settings(BaseSettings):
    """``RECTFLOW_<FIELD>`` variables (empty counts as unset)."""

    model_config = SettingsConfigDict(env_prefix="RECTFLOW_", env_ignore_empty=True, case_sensitive=False,
                                      extra="ignore", frozen=True, hide_input_in_errors=True)

    threads: Annotated[int, Field(ge=0, le=4096)] = Field(
        0, description="torch threads per process; 0: the machine's cores (divided among torchrun ranks).")
    lock_wait: bool = Field(False, description="Queue behind a run that holds the workspace lock instead of refusing.")
    lock_timeout: Seconds = Field(3600.0, description="Longest wait for the workspace lock, seconds.")
    dist_timeout: Seconds = Field(4 * 3600.0, description="torch.distributed collective timeout, seconds.")
    device: str | None = Field(None, description="cpu, cuda, cuda:N; unset: CUDA when present, else CPU.")
    dask_address: str | None = Field(
        None, description="A running Dask scheduler (tcp://HOST:PORT) for couple; wins over couple.dask_address.")

    @field_validator("lock_timeout", "dist_timeout", mode="before")
    @classmethod
    def _finite(cls, v: object) -> object:
        if isinstance(v, str) and v.strip():
            try:
                f = float(v)
            except ValueError:
                return v
            if not math.isfinite(f):
                raise ValueError("expected a finite number of seconds")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        head, _, idx = v.partition(":")
        if head not in ("cpu", "cuda", "mps") or (idx and not idx.isdigit()):
            raise ValueError(f"expected cpu, cuda or cuda:N, got {v!r}")
        return v


@lru_cache(maxsize=1)
def _cached(key: tuple[tuple[str, str], ...]) -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        first = e.errors()[0]
        name = "RECTFLOW_" + ".".join(str(p) for p in first["loc"]).upper()
        raise ParamsError(f"{name}: {' '.join(str(first['msg']).split())}") from None


def settings() -> Settings:
    """The settings of the current environment (read again whenever a ``RECTFLOW_*`` value changes).
    Raises :class:`ParamsError` with one line naming the variable."""
    import os

    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("RECTFLOW_")))
    return _cached(key)
