"""The pipeline stages, one module each, each with a pure ``run(params, layout) -> record``.

A record is a small JSON-able dict (paths, hashes, counts, metrics) that is also written to
``metrics/<stage>.json``; stages never pass tensors or models to each other, only files. Which
stages there are, what each reads and writes, is declared once in :mod:`rectflow.stages`;
:mod:`tasks.runner` runs one.
"""

from rectflow.stages import STAGES

__all__ = ["STAGES"]
