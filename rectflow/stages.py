"""The stage registry: one declaration per pipeline stage, the single source of the DAG.

Each :class:`Stage` names its module (``tasks.NAME``, whose ``run(params, layout) -> record`` the
runner calls), the keys of the resolved params it reads, the files it reads and writes (as functions
of the params: ``reflow.rounds: 2`` makes rf3 and round 3, ``distill.k: 4`` a 4-step student too),
and whether it may run data-parallel under torchrun. ``dvc.yaml`` is generated from it
(:mod:`rectflow.dvcyaml`, ``rectflow dvc-yaml``), with each stage's code dependencies computed from
what its module imports (:mod:`rectflow.codedeps`); the Prefect flow iterates :data:`STAGES`.

The names of the models the stages make are declared here too (:func:`flow_names`,
:func:`student_names`, :func:`variant_names`), so a stage, evaluate and the DAG agree on them.

This module imports nothing of the stages themselves: a stage module is named by its dotted path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rectflow.config import Params

__all__ = [
    "DDP_STAGES", "PIPELINE", "REGISTRY", "STAGES", "Out", "Stage", "check_data_inputs", "data_inputs", "flow_names", "last_flow", "stage",
    "student_names", "variant_names",
]

RESOLVED = "params.resolved.yaml"


# ---- model names ----------------------------------------------------------------------------------


def flow_names(p: Params) -> list[str]:
    """rf1 (pretrain), rf2 … rf{rounds + 1} (reflow), in order."""
    return [f"rf{k}" for k in range(1, p.reflow.rounds + 2)]


def last_flow(p: Params) -> str:
    """The flow distillation learns from: rf{rounds + 1}."""
    return f"rf{p.reflow.rounds + 1}"


def student_names(k: int) -> list[tuple[str, int]]:
    """(name, steps) of the students: the one-step ``distilled`` and, for k > 1, ``distilled-k{k}``."""
    return [("distilled", 1)] + ([(f"distilled-k{k}", k)] if k > 1 else [])


def variant_names(p: Params) -> list[str]:
    """The quantized variants quantize writes: ``STUDENT-VARIANT`` for every student and every one
    of ``quantize.variants`` (int8, int4, bf16), in that order."""
    return [f"{name}-{v}" for name, _ in student_names(p.distill.k) for v in p.quantize.variants]


# ---- declarations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    """A file or folder a stage writes. ``kind``: DVC's outs, metrics or plots; ``cache``: DVC caches it."""

    path: str
    kind: Literal["outs", "metrics", "plots"] = "outs"
    cache: bool = True


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    ``params``: the dotted keys of the resolved params it reads (DVC reruns it when one changes);
    ``inputs(p)``: the data and model files it reads (besides its code); ``outputs(p)``: what it writes;
    ``ddp``: it may run data-parallel under torchrun (``<name>.nproc`` > 1).
    """

    name: str
    summary: str
    params: tuple[str, ...]
    inputs: Callable[[Params], list[str]]
    outputs: Callable[[Params], list[Out]]
    ddp: bool = False
    extra_code: tuple[str, ...] = field(default_factory=tuple)
    """Files that are code but not Python imports (profiles)."""

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"

    @property
    def command(self) -> str:
        return f"rectflow stage {self.name}"


def _model(name: str, schedule: bool = False) -> list[str]:
    files = [f"models/{name}.safetensors", f"models/{name}.json"]
    return files + ([f"models/{name}.schedule.json"] if schedule else [])


def _metrics(name: str) -> Out:
    return Out(f"metrics/{name}.json", "metrics", cache=False)


def _history(name: str) -> Out:
    return Out(f"plots/train/{name}.csv", "plots", cache=False)


def _round(k: int) -> str:
    return f"data/couplings/round-{k}"


def _reflow_outputs(p: Params) -> list[Out]:
    outs: list[Out] = []
    for r in range(1, p.reflow.rounds + 1):
        outs += [Out(f) for f in _model(f"rf{r + 1}", schedule=True)] + [_history(f"rf{r + 1}")]
        outs += [Out(_round(r + 1))] if r + 1 in p.coupled_rounds() else []
    return outs + [_metrics("reflow")]


def _student_files(p: Params) -> list[str]:
    return [f for name, _ in student_names(p.distill.k) for f in _model(name)]


def _teacher_model(p: Params) -> list[str]:
    """``distill.teacher_model``'s files (online distillation), as the project-relative or absolute paths
    the user gave."""
    stem = p.distill.teacher_model
    return [] if stem is None else [f"{stem}.json", f"{stem}.safetensors"]


def _evaluate_inputs(p: Params) -> list[str]:
    flows = flow_names(p)
    files = ["data/prepared", *(_round(k) for k in p.coupled_rounds())]
    for name in flows:
        files += [f"models/{name}.safetensors", f"models/{name}.schedule.json"]
    return files + [f"models/{name}.safetensors" for name, _ in student_names(p.distill.k)] + [
        f"models/{name}.safetensors" for name in variant_names(p)]


def data_inputs(p: Params) -> list[str]:
    """The user's data files or folders (``data.*_path`` of a ``file`` side): dependencies of prepare,
    so DVC reruns the chain when they change (new rows, a new file in a folder)."""
    paths = [getattr(p.data, f"{side}_path") for side in ("source", "target") if getattr(p.data, side) == "file"]
    return list(dict.fromkeys(x for x in paths if x))


def check_data_inputs(p: Params, root: Path) -> None:
    """Each of :func:`data_inputs` is there (a file or a folder, not a FIFO; an ``s3://`` URL with at
    least one Parquet object): else DataError (StorageError) naming the key or URL, before DVC,
    which would refuse the missing dependency in its own words."""
    from rectflow.data import DataError
    from rectflow.io import require_file

    for side in ("source", "target"):
        path = getattr(p.data, f"{side}_path")
        if getattr(p.data, side) == "file" and path and str(path).startswith("s3://"):
            from rectflow.storage import s3_data_objects

            s3_data_objects(str(path), p.storage)  # StorageError: the prefix holds no Parquet object
        elif getattr(p.data, side) == "file" and path:
            full = Path(path) if Path(path).is_absolute() else Path(root) / path
            try:
                require_file(full, DataError, f"data.{side}_path: {path}: no such file or folder (was it removed?)",
                             folder_ok=True)
            except DataError as e:  # named as the user gave it
                raise DataError(str(e).replace(str(full), str(path))) from None


REGISTRY: tuple[Stage, ...] = (
    Stage(
        "resolve", "params.yaml over its profile and the built-in defaults, written once: params.resolved.yaml",
        params=(), inputs=lambda p: [], outputs=lambda p: [Out(RESOLVED, cache=False)],
        extra_code=("rectflow/profiles",),
    ),
    Stage(
        "prepare", "source and target data sets, split train/test, and the frozen FD feature network",
        params=("seed", "data"), inputs=data_inputs,
        outputs=lambda p: [Out("data/prepared"), _metrics("prepare")],
    ),
    Stage(
        "pretrain", "1-rectified flow rf1 on independent pairs, with its BOSS step schedules",
        params=("seed", "data.hflip", "model", "pretrain", "bellman", "schedule.on_new_data", "schedule.finetune_steps"),
        inputs=lambda p: ["data/prepared"],
        outputs=lambda p: [*(Out(f) for f in _model("rf1", schedule=True)), _history("rf1"), _metrics("pretrain")],
        ddp=True,
    ),
    Stage(
        "couple", "round 1: pairs (Z0, Z1 = ODE(Z0)) of rf1 as Parquet shards",
        params=("seed", "data", "couple", "distill.guidance_input", "distill.guidance_range", "storage"),
        inputs=lambda p: ["data/prepared", *_model("rf1", schedule=True)],
        outputs=lambda p: [Out(_round(1)), _metrics("couple")],
    ),
    Stage(
        "reflow", "rf{r+1} on round r's pairs from rf{r}'s weights, then round r+1's pairs, r = 1 … reflow.rounds",
        params=("seed", "data", "couple", "reflow", "distill.guidance_input", "distill.guidance_range",
                "distill.pairs_round", "bellman", "storage"),
        inputs=lambda p: ["data/prepared", _round(1), *_model("rf1")],
        outputs=_reflow_outputs, ddp=True,
    ),
    Stage(
        "distill", "the one-step student (and a k-step one) of the last flow, on its pairs",
        params=("seed", "reflow.rounds", "distill", "storage"),
        inputs=lambda p: ["data/prepared", _round(p.distill_round()), *_model(last_flow(p)),  # SlimFlow draws ε
                          *_teacher_model(p)],
        outputs=lambda p: [*(Out(f) for f in _student_files(p)),
                           *(_history(name) for name, _ in student_names(p.distill.k)), _metrics("distill")],
        ddp=True,
    ),
    Stage(
        "quantize", "the int8, int4 (AWQ), bf16 and fp8 variants of every student, each backend measured",
        params=("seed", "distill.k", "quantize", "evaluate.latency_batch"),
        inputs=lambda p: ["data/prepared", *_student_files(p)],  # the AWQ calibration draws the source
        outputs=lambda p: [*(Out(f) for name in variant_names(p) for f in _model(name)), _metrics("quantize")],
    ),
    Stage(
        "evaluate", "every model against NFE: W2, MMD, FD, straightness, transport cost, latency, size",
        params=("seed", "evaluate", "couple.guidance", "reflow.rounds", "distill.k", "distill.pairs_round",
                "quantize.variants"),
        inputs=_evaluate_inputs,
        outputs=lambda p: [Out("plots/trajectories.png", cache=False), Out("plots/nfe_w2.csv", "plots", cache=False),
                           Out("plots/pareto.png", cache=False),
                           Out("plots/reconstruction.png", cache=False), Out("plots/reconstruction.csv", "plots", cache=False),
                           Out("metrics/eval.json", "metrics", cache=False), _metrics("evaluate")],
    ),
)

_BY_NAME = {s.name: s for s in REGISTRY}
STAGES: tuple[str, ...] = tuple(s.name for s in REGISTRY)
"""Every stage, in DAG order (``rectflow stage NAME``)."""
PIPELINE: tuple[str, ...] = STAGES[1:]
"""The seven stages of the recipe, prepare … evaluate (after ``resolve``)."""
DDP_STAGES: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.ddp)


def stage(name: str) -> Stage:
    """The declaration of stage ``name``; ParamsError naming the choices if there is none."""
    try:
        return _BY_NAME[name]
    except KeyError:
        from rectflow.config import ParamsError

        raise ParamsError(f"stage: unknown {name!r}; expected one of {', '.join(STAGES)}") from None
