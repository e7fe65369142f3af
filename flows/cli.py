"""The ``rectflow`` command (docs/contract.md, "Commands"): the entry layer, above everything else.

``rectflow stage NAME`` runs one stage through :mod:`tasks.runner` (what ``dvc.yaml`` calls), handing
couple a Dask executor when asked (:mod:`flows.dask`); ``rectflow run`` the Prefect pipeline flow;
``rectflow sample`` draws samples from a saved model; ``rectflow serve`` serves the nightly
deployment; ``rectflow dvc-yaml`` writes ``dvc.yaml`` from the stage registry; ``rectflow params``
prints the resolved params. A bad argument, key or value exits with status 2 and one line on stderr.
Heavy modules (torch, Prefect, MLflow, DVC) are imported inside the commands that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rectflow: rectified-flow pipeline (pretrain, couple, reflow, distill, quantize, evaluate).")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
INT64_MAX = 2**63 - 1  # what torch takes as a count
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override KEY=VALUE (dotted key), repeatable")]


def fail(message: str, code: int = 2) -> None:
    """One line ``rectflow: error: MESSAGE`` on stderr, then exit ``code`` (2 bad input, 1 failed).
    Under the flow the status and line are also written to the file ``RECTFLOW_STAGE_OUTCOME``
    names, so that ``rectflow run`` exits as the stage did (DVC's exit status says only 'failed')."""
    from rectflow.secrets import redact_text

    line = redact_text(message)
    print(f"rectflow: error: {line}", file=sys.stderr, flush=True)
    from tasks.runner import OUTCOME_ENV

    if os.environ.get(OUTCOME_ENV):
        from rectflow.io import atomic_write_json

        with contextlib.suppress(OSError):  # the line above is the report; this is for the flow
            atomic_write_json(os.environ[OUTCOME_ENV], {"code": code, "message": line})
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    from rectflow.errors import RunFailedError
    from tasks.runner import StageFailedError, user_errors

    try:
        return fn(*args, **kwargs)
    except user_errors() as e:
        fail(str(e))
    except RunFailedError as e:  # a NaN loss, diverging pairs, memory exhausted after writing
        fail(str(e), code=1)
    except StageFailedError as e:
        fail(str(e), code=1)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="prepare | pretrain | couple | reflow | distill | quantize | evaluate")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one pipeline stage (dvc.yaml calls this)."""
    from rectflow.config import ParamsError
    from tasks.runner import LAUNCHED_ENV, run_stage, stage_params

    try:
        try:  # bad params are refused before the heavy imports: one line, exit 2, at once
            p = stage_params(name, params, set_ or [])
        except ParamsError as e:
            fail(str(e))
        record = _guard(run_stage, name, params, set_ or [], **_services(name, p))
    except typer.Exit as e:
        # Under main()'s standalone_mode=False click *returns* a typer.Exit's code instead of
        # exiting with it; exit here so the status (2 bad input, 1 failure) reaches the caller.
        sys.exit(e.exit_code)
    if os.environ.get("RANK", "0") != "0" or os.environ.get(LAUNCHED_ENV):
        return  # under torchrun: rank 0 prints, or the launcher when it started the ranks itself
    summary = {k: v for k, v in record.items() if not isinstance(v, (dict, list))}
    print(json.dumps(summary), flush=True)


def _services(name: str, p) -> dict:  # type: ignore[no-untyped-def]
    """What the orchestration side hands a stage: a Dask shard executor for couple and reflow
    when ``couple`` asks for Dask (:func:`tasks.couple.uses_dask`)."""
    if name not in ("couple", "reflow"):
        return {}
    from tasks.couple import uses_dask

    if not any(uses_dask(p.couple.for_round(k)) for k in (1, 2)):
        return {}
    try:
        from flows.dask import DaskShards
    except ImportError as e:
        fail(f"couple.workers: {p.couple.workers} needs dask[distributed], which is not installed "
             f"({e.__class__.__name__}: {e}); use couple.workers=1")
    return {"shard_executor": DaskShards(p.couple)}


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Prefect's, DVC's and MLflow's own lines too")] = False,
        ) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral Prefect unless PREFECT_API_URL is set).

    Quiet by default: the stages' own lines, progress and figures. ``--verbose`` brings back
    Prefect's task-run lines, DVC's hints and MLflow's warnings and progress bars.
    """
    from rectflow.params import load_params

    p = _guard(load_params, params, set_ or [])  # bad input fails here, before Prefect starts
    from flows.dvcfiles import check_dvc_lock, kept_dvc_lock
    from rectflow.preflight import check_writable, pipeline_paths
    from rectflow.stages import check_data_inputs

    if not kept_dvc_lock(Path.cwd()).is_file():  # else the flow puts the kept copy back, under the lock
        _guard(check_dvc_lock, Path.cwd())  # so is a dvc.lock that DVC could not read
    _guard(check_writable, "rectflow run", pipeline_paths(p, Path.cwd()), Path.cwd())  # and an unwritable output
    _guard(check_data_inputs, p, Path.cwd())  # and data that is not there
    if not verbose:
        _quiet()
    from flows.prefect_server import prestart

    starting = prestart()  # Prefect's temporary server starts while the rest is imported
    from flows.pipeline import run_cli

    if not verbose:
        _quiet_refusals()
    _guard(run_cli, params, set_ or [], starting, verbose)


def _quiet_refusals() -> None:
    """A stage that refuses its input inside the flow ends ``rectflow run`` with its own one line
    (exit 2; a stage that failed, exit 1, its own error above): Prefect's log records of that same
    exception (the task's and the flow's, with a traceback) are left out of the console.
    ``--verbose`` shows them."""
    import logging

    from rectflow.errors import RunFailedError
    from tasks.runner import StageFailedError, user_errors

    known = (*user_errors(), RunFailedError, StageFailedError)

    def names() -> set[str]:  # the classes and every subclass imported by now, by name
        out, todo = set(), list(known)
        while todo:
            c = todo.pop()
            out.add(c.__name__)
            todo += c.__subclasses__()
        return out

    class _Refusal(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not record.name.startswith("prefect"):
                return True
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, known):
                return False
            try:
                text = record.getMessage()
            except Exception:
                return True
            return not any(f"{n}(" in text or f"{n}:" in text for n in names())

    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("prefect")]
    for logger in [logging.root, *loggers]:  # Prefect's console handler is the root logger's
        for handler in getattr(logger, "handlers", []):
            handler.addFilter(_Refusal())


def _quiet() -> None:
    """Only the pipeline's own lines: Prefect logs warnings and up, MLflow shows no progress bars and
    no signature warnings (set before either is imported, so their settings read these)."""
    import warnings

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")
    warnings.filterwarnings("ignore", message=r".*(signature|type hint).*", category=UserWarning)


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="models/NAME (path) or an MLflow URI models:/NAME@ALIAS")],
    out: Annotated[Path, typer.Option(help="output .parquet")],
    n: Annotated[int, typer.Option(min=1, max=INT64_MAX)] = 1000,
    steps: Annotated[int, typer.Option(min=1, max=INT64_MAX)] = 1,
    solver: Annotated[str, typer.Option()] = "euler",
    seed: Annotated[int, typer.Option(min=0, max=2**64 - 1, help="0 … 2^64 − 1 (torch's generator seeds)")] = 0,
    schedule: Annotated[str, typer.Option(
        help="uniform | bellman: the model's saved BOSS time grid for K = --steps (models/NAME.schedule.json)"
    )] = "uniform",
    inpaint: Annotated[Optional[Path], typer.Option(
        "--inpaint", help="images to complete (with --mask): Parquet d0…, .npy (n, D) or (n, c, h, w); replaces --n")] = None,
    mask: Annotated[Optional[Path], typer.Option(
        "--mask", help="1 = observed, 0 = to fill: .npy (c, h, w), (h, w), (n, c, h, w), (n, h, w) or Parquet rows")] = None,
    strength: Annotated[Optional[float], typer.Option(
        min=0.0, help="steering step size η (with --inpaint; default rectflow.steer's)")] = None,
    label: Annotated[Optional[int], typer.Option(
        "--label", help="a conditional model: generate every sample of class K (0 … classes − 1)")] = None,
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", help="a conditional model: one class per sample, from a .npy (n,) or a Parquet column y; "
        "replaces --n")] = None,
    guidance: Annotated[float, typer.Option(
        "--guidance", help="classifier-free guidance scale w ≥ 0 of a conditional model: 0 unconditional, 1 "
        "conditional (1 forward per step), other values 2 forwards per step")] = 1.0,
) -> None:
    """Generate N samples with a saved model and write them as Parquet (columns d0, d1, …).

    A conditional model (``classes`` in its card) generates for ``--label K`` or ``--labels FILE``,
    else for the classes in turn (sample i of class i mod K), guided at ``--guidance W``; the labels
    are written as column ``y`` and NFE counts network forwards per sample.

    With ``--inpaint FILE --mask FILE``: complete those images where the mask is 0 instead
    (FlowChef steering, :mod:`rectflow.steer`; a flow takes --steps Euler steps, a one-step student
    --steps − 1 corrections, so NFE = --steps either way)."""
    if (inpaint is None) != (mask is None):
        fail("--inpaint FILE needs --mask FILE (1 = observed, 0 = to fill)" if mask is None
             else "--mask FILE needs --inpaint FILE (the images to complete)")
    if strength is not None and inpaint is None:
        fail("--strength: only with --inpaint FILE --mask FILE")
    if label is not None and labels is not None:
        fail("--label and --labels: give one (a class for every sample, or a file of one class per sample)")
    if not guidance >= 0 or guidance == float("inf"):
        fail(f"--guidance: expected a finite scale w ≥ 0, got {guidance:g}")
    if inpaint is not None:
        if label is not None or labels is not None or guidance != 1.0:
            fail("--label, --labels and --guidance: not with --inpaint (inpainting is unconditional)")
        _guard(_inpaint, model, out, inpaint, mask, steps, solver, seed, schedule, strength)
    else:
        _guard(_sample, model, out, n, steps, solver, seed, schedule, label, labels, guidance)


def _check_out(out: Path, command: str = "sample") -> None:
    """``--out`` is a .parquet path that can be written, checked before anything is computed."""
    if out.suffix not in (".parquet", ".pq"):
        fail(f"--out: expected a .parquet path, got {out}")
    if out.is_dir():
        fail(f"--out: {out} is a folder; expected the path of a .parquet file to write")
    from rectflow.preflight import WorkspaceError, check_writable

    try:
        check_writable(f"rectflow {command}", [out.absolute()], Path.cwd())
    except WorkspaceError as e:
        fail(f"--out: {e}")


def _load_sampler(model: str):  # type: ignore[no-untyped-def]
    """``--model``'s stem, network, card and device (a path under models/ or an MLflow URI)."""
    from rectflow.device import pick_device
    from rectflow.models import load_model

    stem = _model_stem(model)
    dev = pick_device()
    net, card = load_model(stem, dev)
    return stem, net, card, dev


def _sample_labels(model: str, card: dict, n: int, label: int | None, labels: Path | None):  # type: ignore[no-untyped-def]
    """The labels ``(n,)`` of a conditional model's samples (None for an unconditional model), every
    misuse one line (exit 2): a label for an unconditional model, a label outside [0, classes), a
    labels file that is not one integer class per sample."""
    import numpy as np

    classes = int(card["arch"].get("classes", 0))
    flag = "--label" if label is not None else "--labels"
    if not classes:
        if label is not None or labels is not None:
            fail(f"{flag}: --model {model} is unconditional (trained without labels); drop {flag}")
        return None
    import torch

    from rectflow.points import read_labels
    from rectflow.tables import check_labels

    if labels is not None:
        y = read_labels(labels)
    elif label is not None:
        y = np.full(n, label, dtype=np.int64)
    else:
        y = np.arange(n, dtype=np.int64) % classes
    return torch.from_numpy(check_labels(y, f"{flag} (--model {model})", classes, key=""))


def _sample(model: str, out: Path, n: int, steps: int, solver: str, seed: int, schedule: str = "uniform",
            label: int | None = None, labels: Path | None = None, guidance: float = 1.0) -> None:
    import numpy as np
    import torch

    from rectflow.solvers import solve

    _check_solver(solver, schedule)
    _check_out(out)
    from rectflow.preflight import check_memory, sample_needs

    stem, net, card, dev = _load_sampler(model)
    y = _sample_labels(model, card, n, label, labels)
    if y is not None:
        from rectflow.guidance import Guided

        n = len(y)
        net = Guided(net, y.to(dev), guidance)
    elif guidance != 1.0:
        fail(f"--guidance: --model {model} is unconditional (trained without labels); drop --guidance")
    check_memory(sample_needs(card["arch"], n, steps, solver), dev)  # ParamsError naming --n or --steps
    times = None
    if schedule == "bellman":  # models/NAME.schedule.json beside the weights; ModelError names it
        from rectflow.schedule import schedule_times

        times = schedule_times(stem, steps, card.get("meta", {}).get("sha256"))
    shape = tuple(card["arch"]["shape"])
    z0 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(dev)
    from rectflow.errors import RunFailedError

    with torch.inference_mode():
        try:
            sol = solve(net, z0, solver, steps, times=times)
        except RunFailedError as e:
            raise RunFailedError(f"--model {model}: {e}; nothing was written") from None
    x = sol.x.float().cpu().numpy().reshape(n, -1)
    if not np.isfinite(x).all():  # never a NaN sample on disk
        bad = int((~np.isfinite(x)).any(1).sum())
        raise RunFailedError(f"--model {model}: {bad} of {n} samples came out NaN or infinite with --solver {solver}, "
                             f"--steps {steps}: the model diverges; nothing was written")
    grid = "adaptive" if solver == "rk45" else schedule
    meta = {"model": model, "shape": list(shape), "solver": solver, "schedule": grid, "nfe": sol.nfe, "seed": seed}
    if times is not None:
        meta["times"] = [float(t) for t in times.tolist()]
    if y is not None:
        meta["guidance"] = guidance
    from rectflow.points import write_points

    write_points(out, x, {} if y is None else {"y": y.numpy()}, meta)
    print(json.dumps({"out": str(out), "n": n, "shape": list(shape), "solver": solver, "schedule": grid, "nfe": sol.nfe}))


def _check_solver(solver: str, schedule: str) -> None:
    """--solver and --schedule name a sampler and a grid it can run on, else one line and exit 2."""
    from rectflow.solvers import SOLVERS

    if solver not in SOLVERS:
        fail(f"--solver: unknown {solver!r}; expected one of {', '.join(SOLVERS)}")
    if schedule not in ("uniform", "bellman"):
        fail(f"--schedule: unknown {schedule!r}; expected uniform or bellman")
    if schedule == "bellman" and solver == "rk45":
        fail("--schedule: 'bellman' needs a fixed-step solver (euler, heun, midpoint), got --solver rk45")


def _model_stem(model: str) -> Path:
    """The local stem (``models/NAME``) of ``--model``: a path, or an MLflow URI downloaded first."""
    from rectflow.io import require_file
    from rectflow.nets import ModelError

    if model.startswith("models:/") or model.startswith("runs:/"):
        from flows.tracking import download_model

        stem = download_model(model)
    else:
        stem = Path(model)
        if stem.suffix in (".safetensors", ".json"):
            stem = stem.with_suffix("")
    require_file(stem.with_suffix(".json"), ModelError, f"--model: {stem.with_suffix('.json')} not found")
    return stem


BATCH = 8192  # points moved at once by invert and transfer
InOpt = Annotated[Path, typer.Option("--in", help="points: .parquet (columns d0, d1, …; others carried) or .npy")]
OutOpt = Annotated[Path, typer.Option(help="output .parquet")]
FlowSteps = Annotated[int, typer.Option(min=1, max=INT64_MAX, help="steps of a fixed-step solver")]
FlowSolver = Annotated[str, typer.Option(help="euler | heun | midpoint (RF-Solver's step) | rk45")]
FlowSchedule = Annotated[str, typer.Option(help="uniform | bellman: the flow's BOSS grid for K = --steps, run "
                                           "backwards when inverting")]


@app.command()
def invert(model: Annotated[str, typer.Option(help="a flow: models/rfK (path) or models:/NAME@ALIAS")],
           in_: InOpt, out: OutOpt, steps: FlowSteps = 8, solver: FlowSolver = "midpoint",
           schedule: FlowSchedule = "uniform") -> None:
    """Invert a flow: points x1 of its target to their x0 = ODE_{1→0}(x1) (for a flow from noise,
    the noise that regenerates them). Parquet out; label and id columns carried."""
    _guard(_move, model, in_, out, "backward", steps, solver, schedule, "invert")


@app.command()
def transfer(model: Annotated[str, typer.Option(help="a flow between two data sets: models/rfK or models:/…")],
             in_: InOpt, out: OutOpt,
             direction: Annotated[str, typer.Option(help="forward: π0 → π1 | backward: π1 → π0")] = "forward",
             steps: FlowSteps = 8, solver: FlowSolver = "midpoint", schedule: FlowSchedule = "uniform") -> None:
    """Carry a user's points between the two data sets of a flow (data.source not gaussian)."""
    if direction not in ("forward", "backward"):
        fail(f"--direction: unknown {direction!r}; expected forward or backward")
    _guard(_move, model, in_, out, direction, steps, solver, schedule, "transfer")


def _move(model: str, inp: Path, out: Path, direction: str, steps: int, solver: str, schedule: str,
          command: str) -> None:
    from rectflow.nets import ModelError
    from rectflow.points import flow_source, read_points, run_points, write_points

    _check_solver(solver, schedule)
    _check_out(out, command)
    stem, net, card, dev = _load_sampler(model)
    meta = card.get("meta", {})
    if meta.get("role", "flow") != "flow":
        raise ModelError(f"--model {model}: a {meta.get('steps', 1)}-step student is a map, not a velocity field: "
                         f"{command} needs a flow (models/rf1, rf2, …)")
    src = flow_source(card)
    if command == "transfer" and src in ("gaussian", None):
        raise ModelError(f"--model {model}: its source π0 is {'noise' if src else 'not recorded'}, not a data set: "
                         "transfer needs a flow between two data sets (data.source a built-in set or file); "
                         "use rectflow invert for noise")
    shape = tuple(card["arch"]["shape"])
    x, carried = read_points(inp, shape, "--in")
    from rectflow.preflight import check_memory, sample_needs

    check_memory(sample_needs(card["arch"], min(len(x), BATCH), steps, solver), dev)  # a batch at a time
    times = None
    if schedule == "bellman":
        from rectflow.schedule import schedule_times

        times = schedule_times(stem, steps, meta.get("sha256"))
    labels = None
    if card["arch"].get("classes"):  # a conditional flow moves each point under its own label (column y)
        if "y" not in carried:
            raise ModelError(f"--in {inp}: --model {model} is conditional: {command} needs each point's class in a "
                             "Parquet column y")
        import torch

        from rectflow.tables import check_labels

        labels = torch.from_numpy(check_labels(carried["y"], f"--in {inp}: column y", int(card["arch"]["classes"]),
                                               key=""))
    y, nfe = run_points(net, x, direction, solver, None if solver == "rk45" else steps, times=times, batch_size=BATCH,
                        labels=labels)
    info = {"model": model, "command": command, "direction": direction, "solver": solver,
            "schedule": "adaptive" if solver == "rk45" else schedule, "nfe": nfe, "in": str(inp), "shape": list(shape)}
    write_points(out, y, carried, info)
    print(json.dumps({"out": str(out), "n": len(y), **{k: info[k] for k in ("direction", "solver", "schedule", "nfe")}}))


def _inpaint(model: str, out: Path, images: Path, mask: Path, steps: int, solver: str, seed: int,
             schedule: str, strength: float | None) -> None:
    """``rectflow sample --inpaint IMAGES --mask MASK``: every input checked before anything is
    computed (one line, exit 2, nothing written), then :func:`rectflow.steer.inpaint` for a flow (or a
    k-step student) or :func:`rectflow.steer.inpaint_one_step` with ``steps − 1`` corrections for a
    one-step student."""
    import numpy as np
    import torch

    from rectflow.errors import RunFailedError
    from rectflow.preflight import check_memory, sample_needs
    from rectflow.steer import FLOW_STRENGTH, STUDENT_STRENGTH, inpaint, inpaint_one_step

    if solver != "euler" or schedule != "uniform":
        fail(f"--inpaint: steers Euler steps on a uniform grid; got --solver {solver} --schedule {schedule}")
    _check_out(out)
    _, net, card, dev = _load_sampler(model)
    shape = tuple(card["arch"]["shape"])
    if len(shape) != 3:
        fail(f"--inpaint: needs an image model (data shape (c, h, w)); --model {model} has shape {shape}")
    from rectflow.points import read_points

    y = read_points(images, shape, "--inpaint")[0].numpy()
    m = _read_mask(mask, shape, len(y))
    check_memory(sample_needs(card["arch"], len(y), steps, "euler"), dev)
    meta = card.get("meta", {})
    one_step = meta.get("role", "flow") != "flow" and meta.get("steps", 1) == 1
    eta = strength if strength is not None else (STUDENT_STRENGTH if one_step else FLOW_STRENGTH)
    y_t = torch.from_numpy(y).to(dev)
    z0 = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    res = inpaint_one_step(net, y_t, m, z0, steps - 1, eta) if one_step else inpaint(net, y_t, m, z0, steps, eta)
    x = res.x.float().cpu().numpy().reshape(len(y), -1)
    if not np.isfinite(x).all():  # never a NaN sample on disk
        raise RunFailedError(f"--model {model}: {int((~np.isfinite(x)).any(1).sum())} of {len(y)} completions came out "
                             f"NaN or infinite with --steps {steps}: the model diverges; nothing was written")
    info = {"file": str(images), "mask": str(mask), "nfe": res.nfe, "strength": eta, "known_mse": res.known_mse}
    from rectflow.points import write_points

    write_points(out, x, {}, {"model": model, "shape": list(shape), "solver": "euler", "schedule": "uniform",
                            "nfe": res.nfe, "seed": seed, "inpaint": info})
    print(json.dumps({"out": str(out), "n": len(y), "shape": list(shape), "nfe": res.nfe, "inpaint": str(images)}))


def _read_mask(path: Path, shape: tuple[int, ...], n: int):  # type: ignore[no-untyped-def]
    """``--mask`` as float32 ``(1 or n, c, h, w)`` (:func:`rectflow.steer.check_mask`): a ``.npy``
    of any shape it takes, or Parquet / ``.npy`` rows ``(m, D)``."""
    import math

    import numpy as np

    from rectflow.data import DataError
    from rectflow.io import require_file
    from rectflow.steer import check_mask
    from rectflow.tables import PARQUET, read_parquet

    require_file(path, DataError, f"--mask: {path} not found")
    if path.suffix.lower() in PARQUET:
        m = read_parquet(path)[0]
    elif path.suffix.lower() == ".npy":
        try:
            m = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - a damaged file: name it, not the parser's internals
            raise DataError(f"--mask {path}: cannot be read ({e.__class__.__name__}: {str(e)[:200]})") from None
    else:
        raise DataError(f"--mask {path}: unsupported file type {path.suffix!r}; expected .npy or .parquet")
    if m.ndim == 2 and m.shape[1] == math.prod(shape) and m.shape != shape[1:]:
        m = m.reshape(len(m), *shape)
    return check_mask(m, shape, n, where=f"--mask {path}")


@app.command()
def serve(params: ParamsOpt = Path("params.yaml")) -> None:
    """Serve the deployment rectflow-pipeline/nightly with its cron schedule (needs a Prefect server)."""
    from rectflow.params import load_params

    p = _guard(load_params, params, [])
    from flows.deploy import serve as _serve

    _serve(p, params)


@app.command(name="dvc-yaml")
def dvc_yaml(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
             check: Annotated[bool, typer.Option("--check", help="exit 1 if dvc.yaml differs, write nothing")] = False) -> None:
    """Write dvc.yaml from the stage registry for these params (rectflow run does it by itself)."""
    from rectflow.dvcyaml import stale_stages, write
    from rectflow.params import load_params

    p = _guard(load_params, params, set_ or [])
    root = Path(params).resolve().parent
    if check:
        stale = stale_stages(p, root)
        if stale:
            fail(f"dvc.yaml: out of date for these params (stages {', '.join(stale)}); run `rectflow dvc-yaml`", code=1)
        print("dvc.yaml: up to date")
        return
    path, changed = write(p, root)
    print(f"{path}: {'written' if changed else 'up to date'}")


@app.command(name="params")
def params_cmd(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
               defaults: Annotated[bool, typer.Option("--defaults", help="the built-in defaults alone")] = False) -> None:
    """Print the resolved params (defaults < profile < params.yaml < --set) as YAML."""
    from rectflow.config import Params
    from rectflow.params import render_resolved, resolve

    if defaults:
        print(render_resolved(Params(profile="none")), end="")
        return
    res = _guard(resolve, params, set_ or [])
    print(f"# {res.note()}")
    print(render_resolved(res.params), end="")


def _guard_secrets() -> None:
    """Before anything else: blank secrets in everything this process prints or logs, and move URL
    credentials of the environment into the clients' own variables (:mod:`rectflow.secrets`), so that
    this process and its children (DVC, the stages) hold only bare URLs. A URL-valued variable whose
    client takes no credentials from it is one line, exit 2."""
    from rectflow.secrets import SplitError, install, split_environment

    install()
    try:
        split_environment()
    except SplitError as e:
        print(f"rectflow: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    """Entry point: exit 0 on success, 2 with one line on bad input, 1 on a failed run."""
    _guard_secrets()
    from rectflow.config import ParamsError
    from rectflow.settings import settings

    try:  # the RECTFLOW_* settings, once, before any command reads one
        settings()
    except ParamsError as e:
        print(f"rectflow: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        rc = app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # usage errors (click's, or the copy typer vendors): unknown option, bad value, missing argument
        if hasattr(e, "format_message") and type(e).__name__ in ("UsageError", "BadParameter", "NoSuchOption",
                                                                  "MissingParameter", "BadOptionUsage", "BadArgumentUsage"):
            from rectflow.secrets import redact_text

            print(f"rectflow: error: {' '.join(redact_text(e.format_message()).split())}", file=sys.stderr, flush=True)
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


def entry() -> None:
    """The ``rectflow`` executable: :func:`main`, then a fast exit.

    Once the command is done, every ``atexit`` handler runs (logging flushed, Prefect's temporary
    server stopped, MLflow runs ended), non-daemon threads are joined and the output streams
    flushed, then the process ends with ``os._exit``. That skips only the interpreter's teardown of
    its modules (torch, MLflow, Prefect, DVC, SQLAlchemy): 1–3 s of freeing memory on a 2-core
    CPU, paid by every stage process and every ``rectflow run``. (:func:`main` itself exits
    normally, for callers in the same process.)
    """
    import atexit
    import threading

    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
