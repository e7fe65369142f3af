"""The seven pipeline stages, one module each, each with a pure ``run(params, layout) -> record``.

A record is a small JSON-able dict (paths, hashes, counts, metrics) that is also written to
``metrics/<stage>.json``; stages never pass tensors or models to each other, only files.
"""

STAGES = ("prepare", "pretrain", "couple", "reflow", "distill", "quantize", "evaluate")
