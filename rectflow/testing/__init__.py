"""Helpers for tests and for trying the pipeline against real services on one machine.

:class:`~rectflow.testing.swift.SwiftS3Server` starts a real S3-compatible object store
(OpenStack Swift with its ``s3api`` middleware) on loopback; ``python -m rectflow.testing.swift``
runs one from a shell. Nothing here is imported by the pipeline itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rectflow.testing.swift import SWIFT_PACKAGES, SwiftS3Server

__all__ = ["SWIFT_PACKAGES", "SwiftS3Server"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m rectflow.testing.swift`` does not import the module twice.
    if name in __all__:
        from rectflow.testing import swift

        return getattr(swift, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
