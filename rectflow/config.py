"""Typed parameters: one frozen, strict pydantic model per section of ``params.yaml``.

(About 470 lines on purpose: the whole schema, every key with its default and description, in one
place that the Prefect form, docs and validation all come from.)

Every model forbids unknown keys, so a typo (``pretrain.stpes``) is an error that names the key, never a
silent default, and types are strict: a boolean is never a number, a float is never an integer
(``1e-3`` is a float: :mod:`rectflow.params` reads YAML with 1.2 rules). This module is the schema and
its built-in defaults; :func:`rectflow.params.resolve` is the only way the pipeline reads parameters
(defaults < profile < ``params.yaml`` < ``--set``, by key presence) and raises :class:`ParamsError`
with one line that names the culprit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from rectflow.errors import InputError
from rectflow.secrets import credential_hint, redact_text, url_problem

BUILTIN_2D = ("moons", "8gaussians", "checkerboard", "scurve", "circles", "swissroll", "gaussian")
BUILTIN_IMAGES = ("digits",)
DataName = Literal[
    "gaussian", "moons", "8gaussians", "checkerboard", "scurve", "circles", "swissroll", "digits", "file"
]
SolverName = Literal["euler", "heun", "midpoint", "rk45"]
ScheduleName = Literal["uniform", "bellman"]
PairSource = Literal["noise", "inversion", "mixed"]
TimeDist = Literal["uniform", "logit_normal", "u_shaped"]
LossName = Literal["l2", "pseudo_huber"]
Precision = Literal["fp32", "bf16"]

INT64_MAX = 2**63 - 1  # every count and size ends up in a torch/numpy int64: larger ones are refused here
PosInt = Annotated[int, Field(gt=0, le=INT64_MAX)]
NonNegInt = Annotated[int, Field(ge=0, le=INT64_MAX)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
UnitFloat = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class ParamsError(InputError, ValueError):
    """A params document (or override) is invalid. ``str(err)`` is one line naming the key."""


_SECTION_OF = {"TrackingParams": "tracking", "StorageParams": "storage", "CoupleParams": "couple",
               "ReflowedCoupleParams": "couple.reflowed", "DataParams": "data", "EvaluateParams": "evaluate"}


# The JSON schema's side of the rule below, for the Prefect form of a served deployment: the
# server validates a run's parameters against it before it creates (and stores) the run.
NO_URL_CREDENTIALS = r"^(?![\s\S]*[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\s]*@)[\s\S]*$"


def _no_credentials_in_schema(schema: dict[str, Any], _cls: type) -> None:
    """Every free-text string property of the section's JSON schema gets :data:`NO_URL_CREDENTIALS`."""
    for prop in schema.get("properties", {}).values():
        for option in [prop, *prop.get("anyOf", [])]:
            if option.get("type") == "string" and "enum" not in option and "const" not in option:
                option["pattern"] = NO_URL_CREDENTIALS


class Section(BaseModel):
    """Base of every section: frozen, unknown keys forbidden, assignment validated, no value ever
    echoed in an error, and no string that holds a secret in a URL (:mod:`rectflow.secrets`: params
    are recorded in params.yaml, params.resolved.yaml, dvc.lock, MLflow and Prefect)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, strict=True,
                              hide_input_in_errors=True, json_schema_extra=_no_credentials_in_schema)

    @field_validator("*", mode="after")
    @classmethod
    def _no_secret_in_urls(cls, v: Any, info: Any) -> Any:
        for text in ([v] if isinstance(v, str) else v if isinstance(v, (list, tuple)) else []):
            problem = url_problem(text) if isinstance(text, str) and "://" in text else None
            if problem:
                key = f"{_SECTION_OF.get(cls.__name__, '')}.{info.field_name}".lstrip(".")
                raise PydanticCustomError(
                    "secret_in_url", "must not contain {problem}: params are recorded in params.yaml, "
                    "params.resolved.yaml, dvc.lock and MLflow; {hint}",
                    {"problem": problem, "hint": credential_hint(key)})
        return v


class DataParams(Section):
    """π0 (``source``) and π1 (``target``): built-in names or ``file`` with a path (docs/contract.md)."""

    source: DataName = Field("gaussian", description="Source π0: gaussian, a built-in set, or file.")
    source_path: str | None = Field(None, description="Parquet/.npy/.npz file, folder of Parquet files or of "
                                    "images, when source is 'file'.")
    target: DataName = Field("moons", description="Target π1: a built-in set or file.")
    target_path: str | None = Field(None, description="Parquet/.npy/.npz file, folder of Parquet files or of "
                                    "images, when target is 'file'.")
    id_column: str | None = Field(None, description="Parquet column naming each row of a file's data: the "
                                  "train/test split hashes it instead of the row's values; not a dimension.")
    n_train: PosInt = Field(50_000, description="Samples drawn from a 2D generator for training.")
    n_test: PosInt = Field(5_000, description="Held-out samples (generators) used by evaluate.")
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.1, description="Held-out fraction of a finite data set (files, digits)."
    )
    noise: NonNegFloat | None = Field(None, description="2D generator noise; None: the set's standard level.")
    hflip: bool = Field(False, description="Random horizontal flips of image training batches.")
    conditional: Literal["auto"] | bool = Field(
        "auto", description="Class-conditional flows (classifier-free guidance, docs/conditional.md): true needs "
        "labels (digits' digit, the 2D sets' natural label, a file's labels); auto: on when the user's files carry "
        "labels (data.label_column, key y of a .npz, class sub-folders); false: labels ignored.")
    label_column: str | None = Field(None, description="Parquet column of integer class labels 0 … K−1 (not a "
                                     "dimension); makes a file's data labelled.")
    classes: PosInt | None = Field(None, description="Conditional runs: the number of classes K (labels 0 … K−1; "
                                   "a larger label is refused); None: the set's own (a file's largest label + 1).")

    @model_validator(mode="after")
    def _paths(self) -> DataParams:
        for side in ("source", "target"):
            kind, path = getattr(self, side), getattr(self, f"{side}_path")
            if kind == "file" and not path:
                raise ValueError(f"data.{side}_path: required when data.{side} is 'file'")
        if self.target == "gaussian":
            raise ValueError("data.target: 'gaussian' is a source, not a target")
        return self


class ModelParams(Section):
    """Velocity network. ``auto`` picks the MLP for vectors and the U-Net for (c, h, w) data."""

    kind: Literal["auto", "mlp", "unet"] = "auto"
    hidden: PosInt = Field(256, description="MLP width.")
    depth: PosInt = Field(3, description="MLP hidden layers.")
    time_embed: PosInt = Field(64, description="Sinusoidal time-embedding width (even).")
    channels: PosInt = Field(32, description="U-Net base channels.")
    channel_mult: list[PosInt] = Field([1, 2], description="U-Net channel multiplier per level.")
    attention: bool = Field(True, description="U-Net self-attention at the lowest resolution.")
    dropout: UnitFloat = 0.0

    @field_validator("time_embed")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even")
        return v


class TrainParams(Section):
    """One training loop for pretrain, reflow and distill (nanoGPT-style, no trainer framework)."""

    steps: PosInt = 4000
    batch_size: PosInt = 1024
    lr: PosFloat = 1e-3
    weight_decay: NonNegFloat = 0.0
    warmup: NonNegInt = Field(200, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Learning rate after the warm-up: constant, or cosine decay from lr to 0 "
        "over the remaining steps (SGDR without restarts, Loshchilov & Hutter 2017)."
    )
    grad_clip: NonNegFloat = Field(1.0, description="Max gradient norm; 0 disables clipping.")
    ema: UnitFloat = Field(0.999, description="EMA decay of the saved weights; 0 disables EMA.")
    time_dist: TimeDist = "uniform"
    loss: LossName = "l2"
    huber_c: PosFloat | None = Field(None, description="Pseudo-Huber c; default 0.00054·√D.")
    precision: Precision = Field("fp32", description="bf16 autocast where the hardware has it.")
    checkpoint_every: PosInt = 1000
    log_every: PosInt = 50
    nproc: PosInt = Field(
        1, description="Processes (one per GPU, or CPU processes) for data-parallel training under torchrun; "
        "> 1: the stage launches torchrun itself. batch_size stays the global batch (batch_size / nproc per "
        "process)."
    )


class PretrainParams(TrainParams):
    coupling: Literal["independent", "minibatch_ot"] = Field(
        "independent", description="1-RF pairing: fresh independent pairs, or exact OT per batch."
    )
    p_uncond: UnitFloat = Field(
        0.1, description="Conditional runs: probability that a training label is replaced by the null class ∅, "
        "so one network holds v(x, t, y) and v(x, t, ∅) (classifier-free guidance, Ho & Salimans 2022)."
    )


class ReflowedCoupleParams(Section):
    """How the pairs of the reflowed flows (rf2, rf3, …: coupling rounds ≥ 2) differ from round 1's.

    The reflow stage couples each flow it trains, for the next round or for distillation. Those
    flows are nearly straight (FD of rf2 on digits: 1.40 with 20 BOSS steps in bf16 against 1.37 with
    100 uniform steps in fp32), so their pairs can be made with fewer steps, in bf16, and in greater
    number for the same time. A null key takes the ``couple`` value.
    """

    n_pairs: PosInt | None = None
    solver: SolverName | None = None
    steps: PosInt | None = None
    precision: Precision | None = None
    schedule: ScheduleName | None = None


class CoupleParams(Section):
    """Pairs (Z0, Z1 = ODE(Z0)) of the current flow, streamed to Parquet shards.

    Round 1 (``rf1``'s pairs) uses these values; rounds ≥ 2 replace the non-null keys of
    ``reflowed`` (:meth:`for_round`).
    """

    n_pairs: PosInt = 50_000
    shard_size: PosInt = 10_000
    batch_size: PosInt = 10_000
    solver: SolverName = "rk45"
    steps: PosInt = Field(100, description="Steps of a fixed-step solver (≥ 100 recommended).")
    rtol: PosFloat = 1e-5
    atol: PosFloat = 1e-5
    precision: Precision = "fp32"
    schedule: ScheduleName = Field(
        "uniform", description="Time grid of a fixed-step solver: `steps` uniform steps, or the flow's BOSS "
        "schedule for K = `steps` (models/rfK.schedule.json)."
    )
    source: PairSource = Field(
        "noise", description="What the pairs start from: noise (Z0 ~ π0, Z1 = ODE_{0→1}(Z0), the recipe); "
        "inversion (Z1 a real training row of the target, Z0 = ODE_{1→0}(Z1) by the round's flow, as in "
        "2-RF++); mixed (a fraction `inversion_fraction` of every shard by inversion, the rest from noise). "
        "Inversion uses the same solver, steps and schedule, run backwards."
    )
    inversion_fraction: UnitFloat = Field(
        0.5, description="With source: mixed, the share of each shard's pairs made by inverting real data."
    )
    labels: Literal["uniform", "frequency"] = Field(
        "uniform", description="Conditional runs: the label of each noise pair, drawn uniformly over the classes or "
        "by their frequency in the target's training split (inversion pairs keep their real row's label)."
    )
    guidance: NonNegFloat = Field(
        1.0, description="Conditional runs: guidance scale w of the teacher that makes round 1's pairs, "
        "v_w = v(x, t, ∅) + w·(v(x, t, y) − v(x, t, ∅)) (InstaFlow); 1 is the plain conditional field (one forward "
        "per step), other values cost two. Later rounds' flows learned the guided field and run at w = 1."
    )
    workers: PosInt = Field(1, description="Dask workers for shard generation (1: in process).")
    dask_address: str | None = Field(
        None, description="A running Dask scheduler (tcp://HOST:PORT) for shard generation; None: a local "
        "cluster of `workers` processes. RECTFLOW_DASK_ADDRESS wins over it."
    )

    reflowed: ReflowedCoupleParams = Field(
        default_factory=ReflowedCoupleParams,
        description="Rounds ≥ 2 (pairs of rf2, rf3, …): n_pairs, solver, steps, precision, schedule; null: as above.",
    )

    @model_validator(mode="after")
    def _schedule_needs_fixed_steps(self) -> CoupleParams:
        if self.schedule == "bellman" and self.solver == "rk45":
            raise ValueError("couple.schedule: 'bellman' needs a fixed-step solver (euler, heun, midpoint), "
                             "got couple.solver 'rk45'")
        later = self.for_round(2)
        if later.schedule == "bellman" and later.solver == "rk45":
            raise ValueError("couple.reflowed.schedule: 'bellman' needs a fixed-step solver (euler, heun, "
                             "midpoint), got solver 'rk45' for rounds ≥ 2")
        return self

    def for_round(self, round_k: int) -> CoupleParams:
        """The settings of coupling round ``round_k``: these for round 1; for later rounds, these with
        the non-null keys of ``reflowed`` in place (``reflowed`` itself emptied)."""
        if round_k <= 1:
            return self
        override = self.reflowed.model_dump(exclude_none=True)
        fields = self.model_dump(exclude={"reflowed"}) | override
        return CoupleParams.model_construct(**fields, reflowed=ReflowedCoupleParams())


class ReflowParams(TrainParams):
    rounds: PosInt = Field(1, description="couple + reflow rounds: 1 makes rf2, 2 makes rf3, ...")
    steps: PosInt = 3000
    lr: PosFloat = 5e-4
    warmup: NonNegInt = 0


class AdversarialParams(Section):
    """The adversarial term of distillation (:mod:`rectflow.adversarial`): a discriminator trained
    beside the student to tell the teacher's Z1 from the student's samples (hinge loss)."""

    weight: NonNegFloat = Field(
        0.0, description="λ of −λ·E[D(x̂1)] in the student's loss; 0: off (plain regression)."
    )
    lr: PosFloat = Field(2e-4, description="Discriminator learning rate (Adam, betas 0.5 / 0.999).")
    channels: PosInt = Field(32, description="Discriminator base width.")


class SlimFlowParams(Section):
    """SlimFlow (Zhu, Liu & Liu 2024): annealing reflow, then one-step distillation with the large
    2-RF teacher's flow-guided term (:class:`rectflow.objectives.SlimFlowLoss`)."""

    reflow_steps: NonNegInt = Field(
        3000, description="Annealing-reflow steps before distillation's `steps` (the student trained as a flow "
        "on the pairs with Z0' = sqrt(1 − β²)·Z0 + β·ε); 0: distillation only.",
    )
    anneal: UnitFloat = Field(0.5, description="Share of reflow_steps over which β goes from 1 to 0 (then 0).")
    schedule: Literal["linear", "cosine", "exp"] = Field(
        "linear", description="β over the annealing: 1 − r, ½(1 + cos πr), or a normalised e^{−5r} (r: its progress)."
    )
    time_dist: TimeDist = Field("uniform", description="p(t) of the annealing reflow.")
    guide_weight: NonNegFloat = Field(1.0, description="Weight of the flow-guided term; 0: off.")
    guide_t: list[UnitFloat] = Field(
        [0.2, 0.8], min_length=2, max_length=2, description="t ~ U(lo, hi) at which the teacher's two-step target is taken."
    )

    @model_validator(mode="after")
    def _ordered(self) -> SlimFlowParams:
        if not self.guide_t[0] <= self.guide_t[1]:
            raise ValueError(f"distill.slimflow.guide_t: expected lo ≤ hi, got {list(self.guide_t)}")
        return self


class MeanFlowParams(Section):
    """MeanFlow on the pairs (:class:`rectflow.objectives.MeanFlowLoss`): an average velocity
    u(z, s, e), one JVP per step."""

    ratio: UnitFloat = Field(
        0.25, description="Share of draws with s < e (the rest s = e: flow matching); MeanFlow's best 1-NFE 25%."
    )
    time_dist: TimeDist = Field("logit_normal", description="p(t) of both times (s their min, e their max).")
    norm_p: NonNegFloat = Field(
        1.0, description="Adaptive loss weight 1/(‖Δ‖² + c)^p of MeanFlow (1: its ImageNet value); 0: distill.loss."
    )
    norm_eps: PosFloat = Field(1e-3, description="c of the adaptive weight.")


class DistillParams(TrainParams):
    method: Literal["regression", "slimflow", "meanflow"] = Field(
        "regression", description="regression: D(Z1 − Z0, v(Z0, 0)) (the recipe); slimflow: annealing reflow, "
        "then regression + flow-guided distillation; meanflow: an average-velocity student (MeanFlow identity).",
    )
    slimflow: SlimFlowParams = Field(default_factory=SlimFlowParams, description="With method: slimflow.")
    meanflow: MeanFlowParams = Field(default_factory=MeanFlowParams, description="With method: meanflow.")
    k: PosInt = Field(1, description="Student steps: 1 is one-step; k > 1 also trains a k-step one.")
    guidance_input: bool = Field(
        False, description="Conditional runs: guidance distillation (Meng et al. 2023): every pair is made at its own "
        "guidance scale w ~ U(guidance_range) (a column w of the shards), and the reflowed flows and the students "
        "take w as an input, so one 1-NFE student serves every scale."
    )
    guidance_range: list[NonNegFloat] = Field(
        [0.0, 5.0], min_length=2, max_length=2, description="With guidance_input: the [lo, hi] that each pair's w "
        "is drawn from, uniformly.",
    )
    adversarial: AdversarialParams = Field(
        default_factory=AdversarialParams,
        description="weight (λ; 0: off), lr, channels of the discriminator added to the regression.",
    )
    pairs_round: PosInt | None = Field(
        None, description="The coupling round whose pairs the students learn (from the last flow's weights): "
        "null: the last flow's own pairs (round reflow.rounds + 1, made by the reflow stage; the recipe); K: round "
        "K's (1: rf1's pairs, the coupling the reflowed flows straightened; the reflow stage then makes no round "
        "reflow.rounds + 1). At most reflow.rounds + 1.",
    )
    student: ModelParams | None = Field(
        None, description="The students' own architecture (keys as in `model`; kind auto follows the data). "
        "None: the teacher's, initialised from its weights; another architecture starts from random weights.",
    )
    teacher_model: str | None = Field(
        None, description="Online distillation from a trained one-step model: the stem (path without suffix, "
        "relative to the project or absolute) of a student saved by an earlier distill stage, e.g. a copy of the "
        "teacher-size models/distilled. Every batch then draws fresh source noise Z0 and targets that model's "
        "one-step output, instead of the stored pairs (never the same pair twice: a small distill.student "
        "over-fits 40k fixed pairs). method: regression only; null: the pairs (the recipe).",
    )
    steps: PosInt = 3000
    lr: PosFloat = 2e-4
    warmup: NonNegInt = 0

    @model_validator(mode="after")
    def _method_options(self) -> DistillParams:
        if self.teacher_model is not None:
            if self.method != "regression":
                raise ValueError(f"distill.teacher_model: online distillation is for distill.method 'regression', "
                                 f"got {self.method!r}")
            if not self.teacher_model.strip() or self.teacher_model.endswith((".json", ".safetensors")):
                raise ValueError(f"distill.teacher_model: expected a model stem (a path without .json or "
                                 f".safetensors), got {self.teacher_model!r}")
        if not self.guidance_range[0] <= self.guidance_range[1]:
            raise ValueError(f"distill.guidance_range: expected lo ≤ hi, got {list(self.guidance_range)}")
        if self.adversarial.weight > 0 and self.method == "meanflow":
            raise ValueError("distill.adversarial.weight: the adversarial term is for distill.method 'regression' "
                             "or 'slimflow', got 'meanflow' (set distill.adversarial.weight: 0)")
        return self


QuantVariant = Literal["int8", "int4", "bf16", "fp8"]


class Int4Params(Section):
    group_size: Literal[32, 64, 128, 256] = Field(
        32, description="Input columns per int4 scale/offset (a layer's columns are zero-padded to a multiple)."
    )
    awq: bool = Field(True, description="Activation-aware input scales (AWQ), searched on calibration draws; "
                      "false: plain round-to-nearest.")
    calibration: PosInt = Field(256, description="Source draws the AWQ search runs on.")
    backend: Literal["auto", "int4pack", "dequant"] = Field(
        "auto", description="int4 Linear path: the x86 int4 kernel (int4pack), weights dequantized at load "
        "(dequant), or auto (measured choice).",
    )


class QuantizeParams(Section):
    variants: list[QuantVariant] = Field(
        ["int8", "int4", "bf16"], description="Quantized variants of every student: int8 (per-channel), int4 "
        "(group-wise, AWQ), bf16, fp8 (E4M3 weights and activations: native on GPUs of compute capability ≥ 8.9, "
        "emulated in fp32 elsewhere, with a line saying so); each written as models/STUDENT-VARIANT and "
        "evaluated beside it.",
    )
    backend: Literal["auto", "torchao", "dynamic"] = Field(
        "auto", description="int8 path: torchao, torch.ao dynamic, or auto (measured choice)."
    )
    int4: Int4Params = Int4Params()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"int8", "half"} & set(data):
            raise PydanticCustomError("renamed", "the keys int8 and half were replaced by variants "
                                      "(a list of int8, int4, bf16)")
        return data

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise PydanticCustomError("duplicate", "each variant at most once")
        return v


class GridEntry(Section):
    """One line of the evaluation grid: which models, which solver, which NFE budgets."""

    models: Literal["flows", "students", "all"] | list[str] = "flows"
    solver: SolverName = "euler"
    steps: list[PosInt] | None = Field(
        None, description="Fixed-step counts; None means the model's own (students) or adaptive."
    )
    schedule: ScheduleName = Field(
        "uniform", description="Time grid of a fixed-step solver: uniform, or each flow's saved BOSS schedule "
        "for K = each of `steps` (models/NAME.schedule.json)."
    )

    @model_validator(mode="after")
    def _schedule_needs_fixed_steps(self) -> GridEntry:
        if self.schedule != "bellman":
            return self
        if self.solver == "rk45":
            raise ValueError("schedule: 'bellman' needs a fixed-step solver (euler, heun, midpoint), got solver 'rk45'")
        if self.steps is None:
            raise ValueError("schedule: 'bellman' needs explicit steps (the K of each saved schedule)")
        if self.models in ("students", "all"):
            raise ValueError(f"schedule: 'bellman' applies to flows only (students have no schedule), got models "
                             f"{self.models!r}")
        return self


def _default_grid() -> list[GridEntry]:
    return [
        GridEntry(models="flows", solver="euler", steps=[1, 2, 4, 8, 100]),
        GridEntry(models="flows", solver="euler", steps=[2, 4, 8], schedule="bellman"),
        GridEntry(models="flows", solver="rk45"),
        GridEntry(models="students", solver="euler"),
    ]


class ReconstructionParams(Section):
    """Reconstruction of held-out target data by every flow: invert x1 → x0 (t: 1 → 0), regenerate
    x0 → x1 with the same solver and steps, and measure ‖x1 − x̂1‖² per dimension (and PSNR for images)."""

    n: PosInt = Field(1000, description="Held-out target rows (at most the test split).")
    solvers: list[SolverName] = Field(default_factory=lambda: ["euler", "heun", "midpoint", "rk45"])
    steps: list[PosInt] = Field(default_factory=lambda: [1, 2, 4, 8], description="Steps of the fixed-step solvers.")


class EvaluateParams(Section):
    n_samples: PosInt = Field(2000, description="Generated and held-out samples per row.")
    grid: list[GridEntry] = Field(default_factory=_default_grid)
    straightness_steps: PosInt = 100
    rtol: PosFloat = 1e-5
    atol: PosFloat = 1e-5
    latency_batch: PosInt = 1024
    guidance: list[NonNegFloat] = Field(
        default_factory=lambda: [0.0, 1.0, 2.0, 3.0, 5.0], description="Conditional runs: the guidance scales w of "
        "the curve of quality and label accuracy against w (rf1 at 100 Euler steps; students that take w as input)."
    )
    mmd_bandwidth: PosFloat | None = Field(None, description="RBF bandwidth; None: median heuristic.")
    inception: str | None = Field(
        None, description="Images: a TorchScript Inception-v3 detector on disk (inception-2015-12-05.pt, as "
        "StyleGAN2-ADA/EDM use) for `fid` beside `fd` in every row (rectflow/fid.py); never downloaded."
    )
    reconstruction: ReconstructionParams = Field(default_factory=ReconstructionParams)
    inpaint_steps: PosInt = Field(
        20, description="Images: the last flow's steered Euler steps when evaluate inpaints the held-out images "
        "under the fixed masks (half, centre, random; the one-step student takes one correction)."
    )


class BellmanParams(Section):
    """BOSS step schedules (rectflow/schedule.py), made for every flow the pipeline trains and saved
    beside it as ``models/rfK.schedule.json``: the least-cost K-step grid for every K = 1 … grid_points."""

    grid_points: Annotated[int, Field(ge=2, le=INT64_MAX)] = Field(
        100, description="Teacher Euler steps of the trajectory the costs come from (the largest K)."
    )
    n_samples: PosInt = Field(1024, description="Source draws the one-step cost matrix is averaged over.")


class TrackingParams(Section):
    mlflow_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    experiment: str = "rectflow"
    registered_model: str | None = Field(
        None, description="Registered name of the one-step model; None: derived from the task (source, target, "
        "shape), so two tasks never share a champion.")
    on_unreachable: Literal["fallback", "fail"] = Field(
        "fallback", description="MLflow server down: log to local sqlite instead, or stop."
    )


class StorageParams(Section):
    """Where pairs go. Credentials are never read from here: environment / AWS profile only."""

    backend: Literal["local", "s3"] = "local"
    endpoint_url: str | None = None
    bucket: str | None = None
    prefix: str = "rectflow"
    region: str = "us-east-1"
    addressing_style: Literal["path", "virtual", "auto"] = "path"


class ScheduleParams(Section):
    cron: str = Field("0 2 * * *", description="Nightly retraining schedule (cron).")
    timezone: str = "UTC"
    on_new_data: Literal["retrain", "finetune"] = Field(
        "retrain", description="When a run finds a new version of the user's data: retrain from scratch, or "
        "finetune: pretrain starts from the flow (rf1) of this task's champion, for schedule.finetune_steps, "
        "and couple, reflow and distill follow as always.")
    finetune_steps: PosInt | None = Field(
        None, description="Pretrain steps when fine-tuning; None: a quarter of pretrain.steps.")


class Params(Section):
    """The whole resolved parameter document (``params.resolved.yaml``)."""

    profile: str = Field(
        "auto", description="Defaults for a kind of run, between the built-in defaults and params.yaml: auto (the "
        "images profile for image targets, none otherwise), none, a profile name (rectflow/profiles/NAME.yaml) "
        "or a path to a YAML file.")
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams()
    couple: CoupleParams = CoupleParams()
    reflow: ReflowParams = ReflowParams()
    distill: DistillParams = DistillParams()
    quantize: QuantizeParams = QuantizeParams()
    evaluate: EvaluateParams = EvaluateParams()
    bellman: BellmanParams = BellmanParams()
    tracking: TrackingParams = TrackingParams()
    storage: StorageParams = StorageParams()
    schedule: ScheduleParams = ScheduleParams()

    def distill_round(self) -> int:
        """The coupling round the students learn from: ``distill.pairs_round``, else the last flow's own
        (round ``reflow.rounds + 1``)."""
        return self.distill.pairs_round or self.reflow.rounds + 1

    def coupled_rounds(self) -> list[int]:
        """The coupling rounds a run makes: 1 … ``reflow.rounds`` (each trains the next flow), and the
        last flow's own round ``reflow.rounds + 1`` only when distillation learns from it."""
        last = self.reflow.rounds + 1
        return list(range(1, last)) + ([last] if self.distill_round() == last else [])

    @model_validator(mode="after")
    def _kinds_fit_data(self) -> Params:
        """A U-Net for a built-in vector target: say so before any stage runs (a file's shape is
        known at prepare, where the same check names the key)."""
        if self.data.target != "file" and not target_is_images(self.data):
            for key, m in (("model", self.model), ("distill.student", self.distill.student)):
                if m is not None and m.kind == "unet":
                    raise ValueError(f"{key}.kind: 'unet' needs (c, h, w) data; data.target {self.data.target!r} "
                                     "is vectors (use mlp or auto)")
        if self.distill.method == "meanflow":  # its two times share the embedding, half each
            key, m = ("distill.student", self.distill.student) if self.distill.student else ("model", self.model)
            if m.time_embed % 4:
                raise ValueError(f"{key}.time_embed: distill.method 'meanflow' embeds two times in it (half each): "
                                 f"needs a multiple of 4, got {m.time_embed}")
        last = self.reflow.rounds + 1
        if self.distill.pairs_round is not None and self.distill.pairs_round > last:
            raise ValueError(f"distill.pairs_round: {self.distill.pairs_round} > reflow.rounds + 1 ({last}), the last "
                             "coupling round there is (null: that last round)")
        return self

    @model_validator(mode="after")
    def _schedules_within_grid(self) -> Params:
        """A BOSS schedule has at most ``bellman.grid_points`` steps: say so before any stage runs."""
        top = self.bellman.grid_points
        if self.couple.schedule == "bellman" and self.couple.steps > top:
            raise ValueError(f"couple.steps: {self.couple.steps} > bellman.grid_points ({top}), the largest K "
                             "of a saved BOSS schedule (couple.schedule is 'bellman')")
        later = self.couple.for_round(2)
        if 2 in self.coupled_rounds() and later.schedule == "bellman" and later.steps > top:
            raise ValueError(f"couple.reflowed: {later.steps} steps > bellman.grid_points ({top}), the largest K "
                             "of a saved BOSS schedule (rounds ≥ 2 use schedule 'bellman')")
        for i, e in enumerate(self.evaluate.grid):
            if e.schedule == "bellman" and e.steps and max(e.steps) > top:
                raise ValueError(f"evaluate.grid.{i}.steps: {max(e.steps)} > bellman.grid_points ({top}), the "
                                 "largest K of a saved BOSS schedule")
        return self



def inception_missing(path: str | Path) -> str:
    """The one-line error for an ``evaluate.inception`` file that is not there (params and rectflow.fid)."""
    return (f"evaluate.inception: {path} does not exist (a TorchScript Inception-v3 detector on disk, such as "
            "inception-2015-12-05.pt; nothing is downloaded)")


def target_is_images(data: DataParams) -> bool:
    """Whether π1 is (c, h, w) data: digits, a folder of images (not of Parquet files), or a 4-D .npy/.npz array."""
    if data.target == "digits":
        return True
    if data.target != "file" or not data.target_path:
        return False
    path = Path(data.target_path)
    from rectflow.io import file_kind

    kind = file_kind(path)
    if kind == "folder":  # of images, unless it holds Parquet files (one table, read by rows)
        return not any(p.suffix.lower() in (".parquet", ".pq") and not p.name.startswith(".") for p in path.iterdir())
    if kind != "file":  # nothing, or a FIFO or device (never opened): prepare names it
        return False
    try:
        if path.suffix.lower() == ".npy":
            import numpy as np

            return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 4
        if path.suffix.lower() == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as z:
                return any(z[k].ndim == 4 for k in z.files[:1])
    except Exception:  # any unreadable file (a damaged zip, a truncated header …): prepare names it
        return False
    return False


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = " ".join(".".join(str(part) for part in first["loc"]).split())  # one line, whatever a key holds
    msg = " ".join(str(first["msg"]).split())
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] in ("literal_error",):
        msg = f"{msg}, got {first.get('input')!r}"
    where = f"{source}: " if source else ""
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if first["type"] == "value_error" and msg.startswith("Value error, "):
        inner = msg[len("Value error, "):]
        if not loc or inner.startswith(f"{loc}."):  # a check that names its own key (across sections, budgets)
            return redact_text(f"{where}{inner}{more}")
    return redact_text(f"{where}{loc or '<root>'}: {msg}{more}")  # a key or a value may hold a URL


def validate(doc: Any, source: str = "") -> Params:
    """Validate a parsed params document; raise :class:`ParamsError` naming the first bad key."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ParamsError(f"{source or 'params'}: expected a mapping of sections, got {type(doc).__name__}")
    try:
        return Params.model_validate(doc)
    except RecursionError:
        raise ParamsError(f"{source or 'params'}: a value is nested too deeply") from None
    except ValidationError as e:
        raise ParamsError(_format_error(e, source)) from None
    except (TypeError, ValueError) as e:  # defensive: pydantic wraps almost everything
        raise ParamsError(f"{source or 'params'}: {e}") from None


def dump_params(p: Params) -> dict[str, Any]:
    """Plain dict (YAML/JSON friendly) of a :class:`Params`."""
    return p.model_dump(mode="json")
