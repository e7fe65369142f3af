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

With ``distill.teacher_model`` (method regression), the targets are not the stored pairs but a trained
one-step model's outputs on fresh source noise every batch (:class:`rectflow.sources.TeacherPairs`):
online distillation, e.g. of the teacher-size student into a smaller ``distill.student``.

Writes ``models/distilled`` (and ``models/distilled-k{k}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rectflow.adversarial import Adversary
from rectflow.config import Params
from rectflow.data import load_prepared
from rectflow.layout import Layout
from rectflow.models import load_model
from rectflow.nets import ModelError, arch_from_params, build_model, load_state, read_model_card
from rectflow.objectives import MeanFlowLoss, Objective, SlimFlowLoss
from rectflow.sources import TeacherPairs
from rectflow.stages import last_flow, student_names
from tasks._common import device, model_sha, open_pairs, rank_world, teacher, train_and_save


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


def teacher_model_stem(p: Params, layout: Layout) -> Path:
    """``distill.teacher_model`` as a path: absolute, or relative to the project root."""
    assert p.distill.teacher_model is not None
    stem = Path(p.distill.teacher_model)
    return stem if stem.is_absolute() else layout.root / stem


def online_teacher(p: Params, layout: Layout, parent_arch: dict[str, Any], seed: int,
                   dev: torch.device) -> tuple[TeacherPairs, dict[str, str]]:
    """The batch source of online distillation from ``distill.teacher_model`` (fresh source draws, its
    one-step outputs as targets) and the record of what it learns from (the model's sha256). The model
    must be a one-step student of the data's shape, unconditional (the labelled case is not built)."""
    stem = teacher_model_stem(p, layout)
    own = {layout.model(name).resolve() for name, _ in student_names(p.distill.k)}
    if stem.resolve() in own:
        raise ModelError(f"distill.teacher_model: {stem} is what this stage writes; copy it elsewhere first "
                         "(e.g. teachers/distilled) and name the copy")
    model, card = load_model(stem, dev)  # a missing or broken file: ModelError, one line, exit 2
    meta, arch = card.get("meta", {}), card["arch"]
    where = f"distill.teacher_model: {stem}"
    if meta.get("role") != "student" or meta.get("steps") != 1:
        raise ModelError(f"{where}: expected a one-step student (a model the distill stage saved with 1 step), "
                         f"got role {meta.get('role')!r} with {meta.get('steps')!r} steps")
    if list(arch["shape"]) != list(parent_arch["shape"]):
        raise ModelError(f"{where}: shape {list(arch['shape'])}, but the data (and {last_flow(p)}) have shape "
                         f"{list(parent_arch['shape'])}")
    if int(arch.get("classes", 0)) or int(parent_arch.get("classes", 0)) or arch.get("guidance_input"):
        raise ModelError(f"{where}: online distillation is for unconditional models; this run or that model "
                         "is conditional")
    src = load_prepared(layout.prepared, "source", "train")
    rank, _ = rank_world()
    batches = TeacherPairs(src, model, tuple(arch["shape"]), seed=seed, device=dev, precision=p.distill.precision,
                           rank=rank)
    return batches, {"teacher_model": str(meta.get("sha256", ""))}


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
        if p.distill.teacher_model is None:
            batches = open_pairs(p, layout, pairs_round, seed=p.seed + 100 + k, dev=dev, model=parent)  # local, else S3
            source = {f"round-{pairs_round}": batches.man["fingerprint"]}
        else:  # online: fresh noise every batch, the one-step model's outputs as targets
            batches, source = online_teacher(p, layout, card["arch"], seed=p.seed + 100 + k, dev=dev)
        adv = p.distill.adversarial
        # a conditional student gets a projection discriminator D(x, y) (rectflow.adversarial)
        adversary = (Adversary(tuple(card["arch"]["shape"]), adv.weight, adv.lr, adv.channels, seed=p.seed + 200 + k,
                               device=dev, classes=int(arch.get("classes", 0))) if adv.weight > 0 else None)
        out.append(train_and_save(
            p=p, layout=layout, name=name, model=model, arch=arch, batches=batches, cfg=cfg,
            seed=p.seed + 100 + k, inputs={parent: model_sha(layout, parent), **source},
            meta={"role": "student", "steps": k, "parent": parent,
                  **({"pairs_round": pairs_round} if p.distill.teacher_model is None else
                     {"teacher_model": p.distill.teacher_model, "teacher_sha256": source["teacher_model"]}),
                  "init": "teacher" if warm else "random",
                  "method": p.distill.method}, dev=dev,
            time_dist="discrete", k=k,
            adversary=adversary, objective=_objective(p, layout, parent, k, dev, adversary),
        ) | {"method": p.distill.method})
    return {"students": out}
