"""Stage 2, pretrain: the 1-rectified flow ``rf1`` on independent pairs (X0 ~ π0, X1 ~ π1).

Pairs are drawn afresh every batch (``pretrain.coupling: independent``), or re-paired by exact OT
within each batch (``minibatch_ot``, the OT-CFM recipe). The flow's BOSS step schedules are saved
beside it (``models/rf1.schedule.json``, section ``bellman``).
"""

from __future__ import annotations

import torch

from rectflow.config import Params
from rectflow.data import load_prepared, prepared_meta
from rectflow.layout import Layout
from rectflow.nets import arch_from_params, build_model
from rectflow.sources import IndependentPairs
from tasks._common import device, rank_world, save_flow_schedule, train_and_save


def run(p: Params, layout: Layout) -> dict:
    dev = device()
    meta = prepared_meta(layout.prepared)
    source = load_prepared(layout.prepared, "source", "train")
    target = load_prepared(layout.prepared, "target", "train")
    arch = arch_from_params(p.model, target.shape)
    torch.manual_seed(p.seed)
    model = build_model(arch)
    batches = IndependentPairs(source, target, p.seed, dev, coupling=p.pretrain.coupling, hflip=p.data.hflip,
                               rank=rank_world()[0])
    inputs = {f"{side}-{split}": meta[side].get("files", {}).get(split, {}).get("sha256", "gaussian")
              for side in ("source", "target") for split in ("train",)}
    record = train_and_save(
        p=p, layout=layout, name="rf1", model=model, arch=arch, batches=batches, cfg=p.pretrain,
        seed=p.seed, inputs=inputs, meta={"role": "flow", "round": 1, "coupling": p.pretrain.coupling}, dev=dev,
    )
    if rank_world()[0] == 0:  # rank 0 saved the model: its BOSS schedules go beside it
        record |= save_flow_schedule(p, layout, "rf1", dev)
    return record
