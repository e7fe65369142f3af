"""Stage 5, distill: a one-step (and, with ``distill.k > 1``, a k-step) student of the last flow.

Trained on the last flow's own pairs (Z0, Z1), or on round ``distill.pairs_round``'s (round 1: the
coupling of rf1 that the reflowed flows straightened), initialised from the last flow's weights (or, with
``distill.student`` another architecture, from seeded random weights), by ``distill.method``:

- ``regression`` (the recipe): the rectified-flow objective restricted to t = 0 (one step:
  D(Z1 − Z0, v(Z0, 0))) or to t ∈ {0, 1/k, …, (k−1)/k}; with ``distill.adversarial.weight`` λ > 0,
  a discriminator trained beside the student adds −λ·E[D(x̂1)] (:mod:`rectflow.adversarial`).
- ``slimflow``: ``distill.slimflow.reflow_steps`` of annealing reflow, then ``steps`` of that
  regression (with the adversarial term when its weight is > 0) plus the flow-guided term of the
  large teacher (:class:`rectflow.objectives.SlimFlowLoss`).
- ``meanflow``: an average-velocity student u(z, s, e) (``average: true`` in its card) trained with
  the MeanFlow identity (:class:`rectflow.objectives.MeanFlowLoss`); sampled z1 = z0 + u(z0, 0, 1),
  or k Euler steps of its averages; from random weights (its times are embedded unscaled).

Writes ``models/distilled`` (and ``models/distilled-k{k}``).
"""

from __future__ import annotations

from typing import Any

import torch

from rectflow.adversarial import Adversary
from rectflow.config import Params
from rectflow.data import load_prepared
from rectflow.layout import Layout
from rectflow.nets import arch_from_params, build_model, load_state, read_model_card
from rectflow.objectives import MeanFlowLoss, Objective, SlimFlowLoss
from rectflow.stages import last_flow, student_names
from tasks._common import device, model_sha, open_pairs, teacher, train_and_save


def student_arch(p: Params, teacher_arch: dict[str, Any]) -> dict[str, Any]:
    """The students' architecture record: ``distill.student`` (else the teacher's), an
    average-velocity network for ``method: meanflow``."""
    d = p.distill
    arch = (teacher_arch if d.student is None
            else arch_from_params(d.student, tuple(teacher_arch["shape"]), key="distill.student",
                                  classes=int(teacher_arch.get("classes", 0)))
            | ({"guidance_input": True} if teacher_arch.get("guidance_input") else {}))
    return arch | {"average": True} if d.method == "meanflow" else arch  # time_embed % 4: checked in config


def _objective(p: Params, layout: Layout, parent: str, k: int, dev: torch.device,
               adversary: Adversary | None) -> Objective | None:
    d = p.distill
    if d.method == "meanflow":
        m = d.meanflow
        return MeanFlowLoss(m.time_dist, m.ratio, d.loss, d.huber_c, norm_p=m.norm_p, norm_eps=m.norm_eps)
    if d.method == "slimflow":
        s = d.slimflow
        src = load_prepared(layout.prepared, "source", "train")
        big, _ = teacher(layout, parent, dev)
        return SlimFlowLoss(
            teacher=big, draw=lambda n, g: src.sample(n, g), reflow_steps=s.reflow_steps,
            anneal_steps=round(s.anneal * s.reflow_steps), schedule=s.schedule, reflow_time_dist=s.time_dist,
            guide_weight=s.guide_weight, guide_t=tuple(s.guide_t), loss=d.loss, huber_c=d.huber_c, k=k,
            adversary=adversary,
        )
    return None


def run(p: Params, layout: Layout) -> dict:
    dev = device()
    pairs_round = p.distill_round()
    parent = last_flow(p)
    card = read_model_card(layout.model(parent))
    arch = student_arch(p, card["arch"])
    # The teacher's weights start a student of its architecture, except SlimFlow's (annealed from a
    # random start, its recipe) and MeanFlow's (another time input: rectflow.layers.IntervalEmbedding).
    warm = arch == card["arch"] and p.distill.method == "regression"
    cfg = p.distill
    if cfg.method == "slimflow":  # the annealing reflow runs before the distillation's steps
        cfg = cfg.model_copy(update={"steps": cfg.steps + cfg.slimflow.reflow_steps})
    out = []
    for name, k in student_names(p.distill.k):
        if warm:
            model = build_model(arch)
            model.load_state_dict(load_state(layout.model(parent)))
        else:  # another architecture (SlimFlow's smaller students): seeded random weights
            with torch.random.fork_rng():
                torch.manual_seed(p.seed + 300 + k)
                model = build_model(arch)
        batches = open_pairs(p, layout, pairs_round, seed=p.seed + 100 + k, dev=dev, model=parent)  # local, else S3
        man = batches.man
        adv = p.distill.adversarial
        # a conditional student gets a projection discriminator D(x, y) (rectflow.adversarial)
        adversary = (Adversary(tuple(card["arch"]["shape"]), adv.weight, adv.lr, adv.channels, seed=p.seed + 200 + k,
                               device=dev, classes=int(arch.get("classes", 0))) if adv.weight > 0 else None)
        out.append(train_and_save(
            p=p, layout=layout, name=name, model=model, arch=arch, batches=batches, cfg=cfg,
            seed=p.seed + 100 + k, inputs={parent: model_sha(layout, parent), f"round-{pairs_round}": man["fingerprint"]},
            meta={"role": "student", "steps": k, "parent": parent, "pairs_round": pairs_round,
                  "init": "teacher" if warm else "random",
                  "method": p.distill.method}, dev=dev,
            time_dist="discrete", k=k,
            adversary=adversary, objective=_objective(p, layout, parent, k, dev, adversary),
        ) | {"method": p.distill.method})
    return {"students": out}
