"""Stage 4, reflow: the (k+1)-rectified flow on the pairs of the k-th, initialised from it.

Round r (r = 1 … ``reflow.rounds``) trains ``rf{r+1}`` on ``data/couplings/round-r`` (pairs streamed
from the shards in shuffled order) starting from ``rf{r}``'s weights, then couples round r + 1 from
``rf{r+1}``: the pairs that the next round, or distillation, learns from (the last round only when
distillation does: ``distill.pairs_round``, :meth:`rectflow.config.Params.coupled_rounds`). Every ``rf{r+1}``
gets its BOSS step schedules beside it (``models/rf{r+1}.schedule.json``, section ``bellman``).
"""

from __future__ import annotations

from rectflow.config import Params
from rectflow.layout import Layout
from rectflow.nets import build_model, load_state
from tasks._common import device, model_sha, open_pairs, rank_world, save_flow_schedule, train_and_save
from tasks.couple import ShardExecutor, run_round


def train_on_pairs(p: Params, layout: Layout, round_k: int, schedule: bool = True) -> dict:
    """rf{round_k + 1} from round ``round_k``'s pairs, initialised from rf{round_k}; with
    ``schedule`` also its BOSS schedules beside it (the pipeline always; a benchmark may skip them)."""
    dev = device()
    parent = f"rf{round_k}"
    from rectflow.nets import read_model_card

    card = read_model_card(layout.model(parent))
    arch = card["arch"]
    if p.distill.guidance_input and arch.get("classes") and not arch.get("guidance_input"):
        # Guidance distillation: the reflowed flow takes each pair's w; rf1's weights start it, and
        # the new embedding of w starts at zero (rectflow.layers.Conditioning), so it starts as rf1.
        arch = arch | {"guidance_input": True}
    model = build_model(arch)
    state = load_state(layout.model(parent))
    missing = set(model.state_dict()) - set(state)
    assert all(k.startswith("cond.scale.") for k in missing), missing  # only the new embedding of w
    model.load_state_dict(state, strict=not missing)
    batches = open_pairs(p, layout, round_k, seed=p.seed + round_k, dev=dev, model=parent)  # local, else S3
    man = batches.man
    inputs = {parent: model_sha(layout, parent), f"round-{round_k}": man["fingerprint"]}
    name = f"rf{round_k + 1}"
    record = train_and_save(
        p=p, layout=layout, name=name, model=model, arch=arch, batches=batches,
        cfg=p.reflow, seed=p.seed + round_k, inputs=inputs, dev=dev,
        meta={"role": "flow", "round": round_k + 1, "parent": parent, "pairs": batches.n_pairs, "source": p.data.source},
    )
    if schedule and rank_world()[0] == 0:  # rank 0 saved the model: its BOSS schedules go beside it
        record |= save_flow_schedule(p, layout, name, dev)
    return record


def run(p: Params, layout: Layout, shard_executor: ShardExecutor | None = None) -> dict:
    rounds = []
    rank, world = rank_world()
    for r in range(1, p.reflow.rounds + 1):
        trained = train_on_pairs(p, layout, r)
        # Under torchrun, rank 0 alone couples the next round (on Dask if so configured); the
        # other ranks wait for it, since the next round trains on those pairs.
        coupled = run_round(p, layout, r + 1, shard_executor) if rank == 0 and r + 1 in p.coupled_rounds() else {}
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        rounds.append({"train": trained, "couple": {k: v for k, v in coupled.items() if k != "sha256"}})
    return {"rounds": rounds, "final_model": f"rf{p.reflow.rounds + 1}"}
