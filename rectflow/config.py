"""Typed parameters: one frozen pydantic model per section of ``params.yaml``.

Every model forbids unknown keys, so a typo (``pretrain.stpes``) is an error that names the key, never a
silent default. :func:`load_params` is the only way the pipeline reads parameters; it applies
``--set KEY=VALUE`` overrides (dotted keys, YAML-typed values, like ``dvc exp run -S``) and raises
:class:`ParamsError` with one line that names the culprit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_2D = ("moons", "8gaussians", "checkerboard", "scurve", "circles", "swissroll", "gaussian")
BUILTIN_IMAGES = ("digits",)
DataName = Literal[
    "gaussian", "moons", "8gaussians", "checkerboard", "scurve", "circles", "swissroll", "digits", "file"
]
SolverName = Literal["euler", "heun", "midpoint", "rk45"]
ScheduleName = Literal["uniform", "bellman"]
TimeDist = Literal["uniform", "logit_normal", "u_shaped"]
LossName = Literal["l2", "pseudo_huber"]
Precision = Literal["fp32", "bf16"]

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
UnitFloat = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class ParamsError(ValueError):
    """A params document (or override) is invalid. ``str(err)`` is one line naming the key."""


class Section(BaseModel):
    """Base of every section: frozen, unknown keys forbidden, assignment validated."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class DataParams(Section):
    """π0 (``source``) and π1 (``target``): built-in names or ``file`` with a path (CONTRACT.md)."""

    source: DataName = Field("gaussian", description="Source π0: gaussian, a built-in set, or file.")
    source_path: str | None = Field(None, description="Parquet/.npy/.npz file when source is 'file'.")
    target: DataName = Field("moons", description="Target π1: a built-in set or file.")
    target_path: str | None = Field(None, description="Parquet/.npy/.npz file when target is 'file'.")
    n_train: PosInt = Field(50_000, description="Samples drawn from a 2D generator for training.")
    n_test: PosInt = Field(5_000, description="Held-out samples (generators) used by evaluate.")
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.1, description="Held-out fraction of a finite data set (files, digits)."
    )
    noise: NonNegFloat | None = Field(None, description="2D generator noise; None: the set's standard level.")
    hflip: bool = Field(False, description="Random horizontal flips of image training batches.")

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


class DistillParams(TrainParams):
    k: PosInt = Field(1, description="Student steps: 1 is one-step; k > 1 also trains a k-step one.")
    adversarial: AdversarialParams = Field(
        default_factory=AdversarialParams,
        description="weight (λ; 0: off), lr, channels of the discriminator added to the regression.",
    )
    steps: PosInt = 3000
    lr: PosFloat = 2e-4
    warmup: NonNegInt = 0


class QuantizeParams(Section):
    int8: bool = True
    half: bool = True
    backend: Literal["auto", "torchao", "dynamic"] = Field(
        "auto", description="int8 path: torchao, torch.ao dynamic, or auto (measured choice)."
    )


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


class EvaluateParams(Section):
    n_samples: PosInt = Field(2000, description="Generated and held-out samples per row.")
    grid: list[GridEntry] = Field(default_factory=_default_grid)
    straightness_steps: PosInt = 100
    rtol: PosFloat = 1e-5
    atol: PosFloat = 1e-5
    latency_batch: PosInt = 1024
    mmd_bandwidth: PosFloat | None = Field(None, description="RBF bandwidth; None: median heuristic.")
    inception: str | None = Field(
        None, description="Images: a TorchScript Inception-v3 detector on disk (inception-2015-12-05.pt, as "
        "StyleGAN2-ADA/EDM use) for `fid` beside `fd` in every row (rectflow/fid.py); never downloaded."
    )


class BellmanParams(Section):
    """BOSS step schedules (rectflow/schedule.py), made for every flow the pipeline trains and saved
    beside it as ``models/rfK.schedule.json``: the least-cost K-step grid for every K = 1 … grid_points."""

    grid_points: Annotated[int, Field(ge=2)] = Field(
        100, description="Teacher Euler steps of the trajectory the costs come from (the largest K)."
    )
    n_samples: PosInt = Field(1024, description="Source draws the one-step cost matrix is averaged over.")


class TrackingParams(Section):
    mlflow_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    experiment: str = "rectflow"
    registered_model: str = "rectflow-onestep"
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


_SECTION_CLASSES: dict[str, type[Section]] = {
    "pretrain": PretrainParams, "couple": CoupleParams, "reflow": ReflowParams,
    "distill": DistillParams, "evaluate": EvaluateParams, "bellman": BellmanParams,
}


def _image_budget() -> dict[str, dict[str, Any]]:
    return {
        "pretrain": {"steps": 4000, "batch_size": 128, "lr": 5e-4, "precision": "bf16"},
        # Round 1 (the curved rf1) needs 100 fp32 steps; the nearly straight rf2 is coupled 12× as
        # many times with 20 bf16 steps (BENCHMARKS.md, "More pairs for distillation on digits"):
        # the adversarial student gains from 120k pairs where regression alone does not.
        "couple": {"n_pairs": 10_000, "shard_size": 2500, "batch_size": 2500, "solver": "euler", "steps": 100,
                   "reflowed": {"n_pairs": 120_000, "steps": 20, "precision": "bf16", "schedule": "bellman"}},
        # U-shaped p(t) and pseudo-Huber: the best 2-RF on digits (BENCHMARKS.md, reflow ablation)
        "reflow": {"steps": 3000, "batch_size": 128, "lr": 2e-4, "precision": "bf16",
                   "time_dist": "u_shaped", "loss": "pseudo_huber"},
        # the adversarial term: distilled FD 1.62 against 2.04 by regression alone on 40k pairs, 1.52
        # on 120k (where regression alone stays at 2.19): BENCHMARKS.md, "Adversarial distillation"
        "distill": {"steps": 3000, "batch_size": 128, "lr": 1e-4, "precision": "bf16", "adversarial": {"weight": 0.01}},
        # RK45 at 1e-4: digits FD of rf1 / rf2 1.383 / 1.362 with 80 / 92 NFE, against 1.376 / 1.366
        # with 236 / 152 NFE at the vector default 1e-5 (BENCHMARKS.md, "Adversarial distillation")
        "evaluate": {"n_samples": 1000, "latency_batch": 256, "rtol": 1e-4, "atol": 1e-4},
        "bellman": {"n_samples": 256},
    }


class ImagesParams(Section):
    """Budgets for image data (c, h, w), where a U-Net step costs ~100× an MLP step on a CPU.

    When the target is images, each key here replaces the stage key's *built-in default*; a value set
    in the stage section itself (in params.yaml or with ``--set``) always wins.
    """

    pretrain: dict[str, Any] = Field(default_factory=lambda: _image_budget()["pretrain"])
    couple: dict[str, Any] = Field(default_factory=lambda: _image_budget()["couple"])
    reflow: dict[str, Any] = Field(default_factory=lambda: _image_budget()["reflow"])
    distill: dict[str, Any] = Field(default_factory=lambda: _image_budget()["distill"])
    evaluate: dict[str, Any] = Field(default_factory=lambda: _image_budget()["evaluate"])
    bellman: dict[str, Any] = Field(default_factory=lambda: _image_budget()["bellman"])

    @model_validator(mode="after")
    def _keys_exist(self) -> ImagesParams:
        for section, values in self.model_dump().items():
            cls = _SECTION_CLASSES[section]
            unknown = sorted(set(values) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"images.{section}.{unknown[0]}: unknown key")
            try:
                cls.model_validate(values)
            except ValidationError as e:  # name the budget key in full: images.distill.adversarial.weight
                first = e.errors()[0]
                key = ".".join(str(part) for part in first["loc"])
                msg = "unknown key" if first["type"] == "extra_forbidden" else " ".join(str(first["msg"]).split())
                raise ValueError(f"images.{section}.{key}: {msg}") from None
        return self


class Params(Section):
    """The whole ``params.yaml``."""

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
    images: ImagesParams = ImagesParams()

    @model_validator(mode="after")
    def _schedules_within_grid(self) -> Params:
        """A BOSS schedule has at most ``bellman.grid_points`` steps: say so before any stage runs."""
        top = self.bellman.grid_points
        if self.couple.schedule == "bellman" and self.couple.steps > top:
            raise ValueError(f"couple.steps: {self.couple.steps} > bellman.grid_points ({top}), the largest K "
                             "of a saved BOSS schedule (couple.schedule is 'bellman')")
        later = self.couple.for_round(2)
        if later.schedule == "bellman" and later.steps > top:
            raise ValueError(f"couple.reflowed: {later.steps} steps > bellman.grid_points ({top}), the largest K "
                             "of a saved BOSS schedule (rounds ≥ 2 use schedule 'bellman')")
        for i, e in enumerate(self.evaluate.grid):
            if e.schedule == "bellman" and e.steps and max(e.steps) > top:
                raise ValueError(f"evaluate.grid.{i}.steps: {max(e.steps)} > bellman.grid_points ({top}), the "
                                 "largest K of a saved BOSS schedule")
        return self

    def effective(self) -> Params:
        """These params as the stages use them: the ``images`` budget applied when the target is images."""
        if not target_is_images(self.data):
            return self
        updates: dict[str, Any] = {}
        for section, values in self.images.model_dump().items():
            current = getattr(self, section)
            changes = _budget_changes(current, values)
            if changes:
                updates[section] = type(current).model_validate(current.model_dump() | changes)
        eff = self.model_copy(update=updates)
        try:  # the checks across sections, on the budgeted values (a BOSS K within bellman.grid_points)
            eff._schedules_within_grid()
        except ValueError as e:
            raise ParamsError(f"{e} (with the images budget applied)") from None
        det = eff.evaluate.inception
        if det and not Path(det).expanduser().is_file():  # before any stage runs, not after training
            raise ParamsError(inception_missing(det))
        return eff


def inception_missing(path: str | Path) -> str:
    """The one-line error for an ``evaluate.inception`` file that is not there (params and rectflow.fid)."""
    return (f"evaluate.inception: {path} does not exist (a TorchScript Inception-v3 detector on disk, such as "
            "inception-2015-12-05.pt; nothing is downloaded)")


def _budget_changes(current: Section, values: dict[str, Any]) -> dict[str, Any]:
    """The keys of an ``images`` budget that apply to ``current``: those still at their built-in
    default, key by key inside a nested section (``couple.reflowed``)."""
    fields = type(current).model_fields
    changes: dict[str, Any] = {}
    for k, v in values.items():
        now = getattr(current, k)
        if isinstance(now, Section) and isinstance(v, dict):
            inner = _budget_changes(now, v)
            if inner:
                changes[k] = now.model_dump() | inner
        elif now == fields[k].get_default(call_default_factory=True):
            changes[k] = v
    return changes


def target_is_images(data: DataParams) -> bool:
    """Whether π1 is (c, h, w) data: digits, an image folder, or a 4-D .npy/.npz array."""
    if data.target == "digits":
        return True
    if data.target != "file" or not data.target_path:
        return False
    path = Path(data.target_path)
    try:
        if path.is_dir():
            return True
        if path.suffix.lower() == ".npy":
            import numpy as np

            return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 4
        if path.suffix.lower() == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as z:
                return any(z[k].ndim == 4 for k in z.files[:1])
    except (OSError, ValueError, EOFError):
        return False  # prepare reports the bad file with its name
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
            return f"{where}{inner}{more}"
    return f"{where}{loc or '<root>'}: {msg}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"pretrain.steps=500"`` -> (["pretrain", "steps"], 500); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"--set {item!r}: expected KEY=VALUE with a dotted key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except RecursionError:
        raise ParamsError(f"--set {key}: value is nested too deeply") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"--set {key}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"--set {key}: value must be finite, got {raw!r}")
    return key.strip().split("."), value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``doc`` with each ``KEY=VALUE`` applied (dotted keys, nested dicts)."""
    import copy

    out = copy.deepcopy(doc)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ParamsError(f"--set {item.partition('=')[0]}: {'.'.join(path[: i + 1])} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


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


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"{p}: params file not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise ParamsError(f"{p}: not UTF-8 text") from None
    except RecursionError:
        raise ParamsError(f"{p}: a value is nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{p}: not valid YAML{at}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ParamsError(f"{p}: expected a mapping of sections, got {type(doc).__name__}")
    return doc


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read ``path``, apply ``overrides`` (``KEY=VALUE``), validate. Raises :class:`ParamsError`."""
    doc = apply_overrides(read_yaml(path), overrides or [])
    return validate(doc, str(path))


def dump_params(p: Params) -> dict[str, Any]:
    """Plain dict (YAML/JSON friendly) of a :class:`Params`."""
    return p.model_dump(mode="json")
