"""Stage 5, distill: a one-step (and, with ``distill.k > 1``, a k-step) student of the last flow.

Trained on the last flow's own pairs (Z0, Z1), initialised from its weights (or, with
``distill.student`` another architecture, from random weights), with the rectified-flow
objective restricted to t = 0 (one step: D(Z1 − Z0, v(Z0, 0))) or to t ∈ {0, 1/k, …, (k−1)/k}.
With ``distill.adversarial.weight`` λ > 0, a discriminator trained beside the student on the same
pairs adds −λ·E[D(x̂1)] to that loss (:mod:`rectflow.adversarial`).
Writes ``models/distilled`` (and ``models/distilled-k{k}``).
"""

from __future__ import annotations

import torch

from rectflow.adversarial import Adversary
from rectflow.config import Params
from rectflow.layout import Layout
from rectflow.nets import arch_from_params, build_model, load_state, read_model_card
from rectflow.stages import last_flow, student_names
from tasks._common import device, model_sha, open_pairs, train_and_save


def run(p: Params, layout: Layout) -> dict:
    dev = device()
    last = p.reflow.rounds + 1
    parent = last_flow(p)
    card = read_model_card(layout.model(parent))
    out = []
    arch = card["arch"] if p.distill.student is None else arch_from_params(p.distill.student, tuple(card["arch"]["shape"]))
    warm = arch == card["arch"]  # the teacher's architecture: start from its weights
    for name, k in student_names(p.distill.k):
        if warm:
            model = build_model(arch)
            model.load_state_dict(load_state(layout.model(parent)))
        else:  # another architecture (SlimFlow's smaller students): seeded random weights
            with torch.random.fork_rng():
                torch.manual_seed(p.seed + 300 + k)
                model = build_model(arch)
        batches = open_pairs(p, layout, last, seed=p.seed + 100 + k, dev=dev, model=parent)  # local, else S3
        man = batches.man
        adv = p.distill.adversarial
        adversary = (Adversary(tuple(card["arch"]["shape"]), adv.weight, adv.lr, adv.channels, seed=p.seed + 200 + k,
                               device=dev) if adv.weight > 0 else None)
        out.append(train_and_save(
            p=p, layout=layout, name=name, model=model, arch=arch, batches=batches, cfg=p.distill,
            seed=p.seed + 100 + k, inputs={parent: model_sha(layout, parent), f"round-{last}": man["fingerprint"]},
            meta={"role": "student", "steps": k, "parent": parent, "init": "teacher" if warm else "random"}, dev=dev,
            time_dist="discrete", k=k,
            adversary=adversary,
        ))
    return {"students": out}
