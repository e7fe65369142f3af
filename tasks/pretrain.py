"""Stage 2, pretrain: the 1-rectified flow ``rf1`` on independent pairs (X0 ~ π0, X1 ~ π1).

Pairs are drawn afresh every batch (``pretrain.coupling: independent``), or re-paired by exact OT
within each batch (``minibatch_ot``, the OT-CFM recipe). The flow's BOSS step schedules are saved
beside it (``models/rf1.schedule.json``, section ``bellman``). With ``schedule.on_new_data:
finetune`` and a new version of the user's data, rf1 starts from the champion's flow instead
(:func:`warm_start`) and trains ``schedule.finetune_steps``.
"""

from __future__ import annotations

import torch

from rectflow.config import Params
from rectflow.data import data_version_key, load_prepared, prepared_meta
from rectflow.layout import Layout
from rectflow.nets import arch_from_params, build_model, load_state, read_model_card
from rectflow.sources import IndependentPairs
from tasks._common import device, rank_world, save_flow_schedule, train_and_save


def warm_start(p: Params, layout: Layout, arch: dict, meta: dict) -> dict | None:
    """What a fine-tuning pretrain starts from (``schedule.on_new_data: finetune``): the champion's
    flow the pipeline put in ``.rectflow/warm`` when it found this data version (``warm.json``'s
    ``for_version``), with this run's network; else None, and rf1 trains from scratch (no champion
    yet, a data version the kept flow is not for, another network: that case says so). A rerun on
    the same data version (params changed) starts from the same flow: rf1 is a function of that
    flow, the data and the params."""
    import json

    if p.schedule.on_new_data != "finetune":
        return None
    try:
        info = json.loads((layout.warm / "warm.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("for_version") != data_version_key(meta):
        return None
    card = read_model_card(layout.warm / "rf1")
    if card["arch"] != json.loads(json.dumps(arch)):
        print(f"[rf1] not fine-tuning {info.get('champion')}'s flow: its network differs from model's; training "
              "from scratch", flush=True)
        return None
    return {"champion": str(info.get("champion")), "sha256": str(card["meta"]["sha256"]),
            "for_version": info["for_version"]}


def run(p: Params, layout: Layout) -> dict:
    dev = device()
    meta = prepared_meta(layout.prepared)
    source = load_prepared(layout.prepared, "source", "train")
    target = load_prepared(layout.prepared, "target", "train")
    arch = arch_from_params(p.model, target.shape, classes=target.classes if target.labelled else 0)
    torch.manual_seed(p.seed)
    model = build_model(arch)
    batches = IndependentPairs(source, target, p.seed, dev, coupling=p.pretrain.coupling, hflip=p.data.hflip,
                               rank=rank_world()[0])
    inputs = {f"{side}-{split}": meta[side].get("files", {}).get(split, {}).get("sha256", "gaussian")
              for side in ("source", "target") for split in ("train",)}
    for side, dist in (("source", source), ("target", target)):  # a conditional run's labels are inputs too
        if dist.labelled:
            inputs[f"{side}-train-labels"] = meta[side]["files"]["train"]["labels_sha256"]
    cfg, card_meta = p.pretrain, {"role": "flow", "round": 1, "coupling": p.pretrain.coupling, "source": p.data.source}
    warm = warm_start(p, layout, arch, meta)
    if warm is not None:  # fine-tuning on new data: from the champion's flow, for its own step budget
        model.load_state_dict(load_state(layout.warm / "rf1"))
        steps = p.schedule.finetune_steps or max(1, p.pretrain.steps // 4)
        cfg = p.pretrain.model_copy(update={"steps": steps, "warmup": min(p.pretrain.warmup, steps // 10)})
        inputs["warm_start"] = warm["sha256"]
        card_meta["warm_start"] = warm
        print(f"[rf1] fine-tuning {warm['champion']}'s flow on the new data for {steps} steps", flush=True)
    record = train_and_save(
        p=p, layout=layout, name="rf1", model=model, arch=arch, batches=batches, cfg=cfg,
        seed=p.seed, inputs=inputs, meta=card_meta, dev=dev,
    )
    if warm is not None:
        record["warm_start"] = warm
    if rank_world()[0] == 0:  # rank 0 saved the model: its BOSS schedules go beside it
        record |= save_flow_schedule(p, layout, "rf1", dev)
    return record
