"""Test support that the tests (and ``benchmarks/``, run from the repository root) import; not shipped.

:mod:`tests.support.swift` starts a real S3-compatible object store (OpenStack Swift with its
``s3api`` middleware) on loopback, :class:`~tests.support.swift.SwiftS3Server`; ``python -m
tests.support.swift`` runs one from a shell. :mod:`tests.support.tiny` holds ``TINY``, the
``--set`` overrides of the tests' tiny pipeline. Nothing here is imported by the pipeline itself.
"""
