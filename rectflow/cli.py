"""The ``rectflow`` command (CONTRACT.md, "Commands").

``rectflow stage NAME`` runs one stage (what ``dvc.yaml`` calls); ``rectflow run`` the Prefect
pipeline flow; ``rectflow sample`` draws samples from a saved model; ``rectflow serve`` serves the
nightly deployment. A bad argument, key or value exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rectflow: rectified-flow pipeline (pretrain, couple, reflow, distill, quantize, evaluate).")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override KEY=VALUE (dotted key), repeatable")]


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2), not a bug."""
    from rectflow.config import ParamsError
    from rectflow.data import DataError
    from rectflow.nets import ModelError
    from rectflow.pairs import ManifestError

    errs: list[type[BaseException]] = [ParamsError, DataError, ModelError, ManifestError]
    try:
        from rectflow.storage import StorageError

        errs.append(StorageError)
    except ImportError:
        pass
    return tuple(errs)


def fail(message: str, code: int = 2) -> None:
    print(f"rectflow: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    from rectflow.train import NonFiniteLossError

    try:
        return fn(*args, **kwargs)
    except _user_errors() as e:
        fail(str(e))
    except NonFiniteLossError as e:
        fail(str(e), code=1)


def run_stage(name: str, params: Path, overrides: list[str], root: Path = Path(".")) -> dict:
    """Load params, run stage ``name``, write ``metrics/<name>.json``; returns the stage's record."""
    import importlib

    from rectflow.config import load_params
    from rectflow.io import atomic_write_json
    from rectflow.layout import Layout
    from tasks import STAGES

    if name not in STAGES:
        from rectflow.config import ParamsError

        raise ParamsError(f"stage: unknown {name!r}; expected one of {', '.join(STAGES)}")
    p = load_params(params, overrides)
    _configure_threads()
    layout = Layout(root)
    module = importlib.import_module(f"tasks.{name}")
    t0 = time.perf_counter()
    record = module.run(p, layout)
    record = {"stage": name, "wall_seconds": round(time.perf_counter() - t0, 3)} | record
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        atomic_write_json(layout.stage_metrics(name), record)
    return record


def _configure_threads() -> None:
    import torch

    n = int(os.environ.get("RECTFLOW_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(n)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="prepare | pretrain | couple | reflow | distill | quantize | evaluate")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one pipeline stage (dvc.yaml calls this)."""
    record = _guard(run_stage, name, params, set_ or [])
    summary = {k: v for k, v in record.items() if not isinstance(v, (dict, list))}
    print(json.dumps(summary), flush=True)


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral Prefect unless PREFECT_API_URL is set)."""
    from rectflow.config import load_params

    _guard(load_params, params, set_ or [])  # bad input fails here, before Prefect starts
    from flows.pipeline import run_cli

    _guard(run_cli, params, set_ or [])


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="models/NAME (path) or an MLflow URI models:/NAME@ALIAS")],
    out: Annotated[Path, typer.Option(help="output .parquet")],
    n: Annotated[int, typer.Option(min=1)] = 1000,
    steps: Annotated[int, typer.Option(min=1)] = 1,
    solver: Annotated[str, typer.Option()] = "euler",
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Generate N samples with a saved model and write them as Parquet (columns d0, d1, …)."""
    _guard(_sample, model, out, n, steps, solver, seed)


def _sample(model: str, out: Path, n: int, steps: int, solver: str, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from rectflow.device import pick_device
    from rectflow.io import atomic_path
    from rectflow.nets import ModelError, load_model
    from rectflow.solvers import SOLVERS, solve

    if solver not in SOLVERS:
        fail(f"--solver: unknown {solver!r}; expected one of {', '.join(SOLVERS)}")
    if out.suffix not in (".parquet", ".pq"):
        fail(f"--out: expected a .parquet path, got {out}")
    if model.startswith("models:/") or model.startswith("runs:/"):
        from flows.tracking import download_model

        stem = download_model(model)
    else:
        stem = Path(model)
        if stem.suffix in (".safetensors", ".json"):
            stem = stem.with_suffix("")
    if not stem.with_suffix(".json").is_file():
        raise ModelError(f"--model: {stem.with_suffix('.json')} not found")
    dev = pick_device()
    net, card = load_model(stem, dev)
    shape = tuple(card["arch"]["shape"])
    z0 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.inference_mode():
        sol = solve(net, z0, solver, steps)
    x = sol.x.float().cpu().numpy().reshape(n, -1)
    table = pa.table({f"d{i}": x[:, i] for i in range(x.shape[1])})
    table = table.replace_schema_metadata({"rectflow": json.dumps({"model": model, "shape": list(shape), "solver": solver, "nfe": sol.nfe, "seed": seed})})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    print(json.dumps({"out": str(out), "n": n, "shape": list(shape), "solver": solver, "nfe": sol.nfe}))


@app.command()
def serve(params: ParamsOpt = Path("params.yaml")) -> None:
    """Serve the deployment rectflow-pipeline/nightly with its cron schedule (needs a Prefect server)."""
    from rectflow.config import load_params

    p = _guard(load_params, params, [])
    from flows.deploy import serve as _serve

    _serve(p, params)


def main() -> None:
    try:
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.UsageError):
            fail(e.format_message())
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
