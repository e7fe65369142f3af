"""Shared helpers of the benchmarks: workspaces, environment record, results and BENCHMARKS.md."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Overridable so that a run elsewhere (another machine, a copy of the tree) can write its files aside.
RESULTS = Path(os.environ.get("RECTFLOW_BENCH_RESULTS") or ROOT / "benchmarks" / "results")
BENCHMARKS_MD = Path(os.environ.get("RECTFLOW_BENCH_MD") or ROOT / "BENCHMARKS.md")
PARAMS = ROOT / "params.yaml"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
if str(ROOT) not in sys.path:  # `tasks` and `benchmarks` import from the repository root
    sys.path.insert(0, str(ROOT))


# ---- environment ---------------------------------------------------------------------------------


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages (``/proc/loadavg``); [] where there is none."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD's short hash, with `` + working tree`` when tracked files differ from it."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + (" + working tree" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """What a timing depends on: machine, threads, versions, load, date, commit."""
    import torch

    from rectflow.device import pick_device

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(pick_device()),
        "python": platform.python_version(),
        "loadavg": loadavg(),
    }


def set_threads(n: int | None = None) -> int:
    """Torch intra-op threads: ``n``, else ``RECTFLOW_THREADS``, else every CPU (as the stages do)."""
    import torch

    n = n or int(os.environ.get("RECTFLOW_THREADS", "0")) or os.cpu_count() or 1
    os.environ["RECTFLOW_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def wait_for_quiet(max_load: float, timeout_s: float, poll_s: float = 15.0) -> list[float]:
    """Wait (at most ``timeout_s``) until the 1-minute load is below ``max_load``; return the load."""
    t0 = time.monotonic()
    while True:
        load = loadavg()
        if not load or load[0] < max_load or time.monotonic() - t0 >= timeout_s:
            return load
        print(f"[bench] 1-minute load {load[0]:.2f} ≥ {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(poll_s)


# ---- running the pipeline's own stages -----------------------------------------------------------


def run_stage(name: str, root: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Run stage ``name`` exactly as ``rectflow stage NAME --set ...`` does, in workspace ``root``."""
    from tasks.runner import run_stage as _run

    root.mkdir(parents=True, exist_ok=True)
    return _run(name, PARAMS, list(overrides), root)


def workspace_params(root: Path):  # type: ignore[no-untyped-def]
    """The validated parameters a finished workspace ran on (its ``params.resolved.yaml``): a
    :class:`rectflow.config.Params`; ParamsError with one line naming the file when it is missing or
    invalid (a benchmark's ``main`` turns that into ``ap.error``: exit 2)."""
    from rectflow.config import validate
    from rectflow.params import RESOLVED_FILE, read_yaml

    path = Path(root) / RESOLVED_FILE
    return validate(read_yaml(path), str(path))


def solve_chunked(model, z, steps: int, chunk: int = 2500):  # type: ignore[no-untyped-def]
    """``steps`` Euler steps of ``model`` from ``z: (n, *shape)``, ``chunk`` rows at a time (couple's
    batch), under inference mode; fp32 ``(n, *shape)`` out."""
    import torch

    from rectflow.solvers import solve

    with torch.inference_mode():
        return torch.cat([solve(model, z[i:i + chunk], "euler", steps).x.float() for i in range(0, len(z), chunk)])


def result_label(label: str | None) -> str | None:
    """A ``--label`` of a benchmark that publishes as NAME_LABEL: lower-case letters, digits and _ (or
    None); ValueError with one line otherwise (``main`` turns it into ``ap.error``)."""
    if label is not None and not re.fullmatch(r"[a-z0-9_]+", label):
        raise ValueError(f"--label {label!r}: expected lower-case letters, digits and _")
    return label


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# ---- training loops: rectflow's against a bare one -----------------------------------------------


def sync(dev) -> None:  # type: ignore[no-untyped-def]
    """Wait for the device's queued work (a no-op on a CPU), so that a wall-clock interval is honest."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_train_rate(model, x0, x1, steps: int, warmup: int, precision: str, lr: float) -> float:  # type: ignore[no-untyped-def]
    """Samples/s of forward + MSE + backward + AdamW on one fixed batch ``x0, x1: (B, *shape)`` (the
    straight-path target ``x1 - x0`` at ``t ~ U(0, 1)``): no data pipeline, EMA, clipping or bookkeeping.
    ``warmup`` untimed steps first; ``precision`` ``bf16`` runs the forward under autocast."""
    import torch

    dev = x0.device
    model = model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
    t = torch.rand(len(x0), device=dev)
    tb = t.reshape(-1, *([1] * (x0.ndim - 1)))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        xt = x0 + tb * (x1 - x0)
        with autocast:
            pred = model(xt, t)
        loss = (pred.float() - (x1 - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return steps * len(x0) / (time.perf_counter() - t0)


def rectflow_train_rate(make_model, source, target, overrides: Sequence[str], steps: int, warmup: int,  # type: ignore[no-untyped-def]
                        device, work: Path) -> float:
    """Samples/s of :func:`rectflow.train.train` exactly as the pretrain stage runs it (pairs of
    ``source`` × ``target`` drawn each step, p(t), lr warm-up, clipping, EMA, loss bookkeeping), with
    ``pretrain.*`` from params.yaml plus ``overrides``; a ``warmup``-step run of a fresh
    ``make_model()`` first, as the bare loop's untimed steps."""
    import shutil

    from rectflow.params import load_params
    from rectflow.sources import IndependentPairs
    from rectflow.train import train

    p = load_params(PARAMS, [*overrides, f"pretrain.steps={steps}", f"pretrain.checkpoint_every={steps + 1}"])
    shutil.rmtree(work, ignore_errors=True)
    train(make_model(), IndependentPairs(source, target, 1, device), p.pretrain.model_copy(update={"steps": warmup}),
          name="warmup", seed=1, checkpoint_dir=work / "w", device=device)
    res = train(make_model(), IndependentPairs(source, target, 0, device), p.pretrain, name="bench", seed=0,
                checkpoint_dir=work / "c", device=device)
    return res.samples_per_s


def interleaved(first, second, repeats: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """``repeats`` rounds of ``first()`` then ``second()``: this VM's speed drifts within a minute, so
    each round's two figures see the same machine and their ratio is the honest comparison."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        a.append(first())
        b.append(second())
    return a, b


# ---- statistics and tables -----------------------------------------------------------------------


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_pm(xs: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(xs)
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def load_line(load: Sequence[float]) -> str:
    return "load average " + (" / ".join(f"{x:.2f}" for x in load) if load else "unknown") + " (1 / 5 / 15 min)"


# ---- results -------------------------------------------------------------------------------------


def result_path(name: str, quick: bool = False) -> Path:
    return RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")


def write_result(name: str, data: dict[str, Any], quick: bool = False) -> Path:
    """Write ``benchmarks/results/NAME.json`` (``NAME.quick.json`` for a smoke run) atomically."""
    from rectflow.io import atomic_write_json

    path = result_path(name, quick)
    atomic_write_json(path, _json_safe(data))
    return path


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


_HEADER = """# Benchmarks

Run by hand: `make bench` (= `.venv/bin/python -m benchmarks.run_all`), or one benchmark with the
command given in its section. Each writes `benchmarks/results/NAME.json` and replaces its own section
below (between its `bench:NAME` markers); `--quick` runs a smoke-sized version that writes
`NAME.quick.json` and leaves this file alone. Timings depend on the machine and on what else runs on
it: every section states the machine, the threads and the load average at the time.
"""


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section of ``name`` in BENCHMARKS.md, between its markers."""
    from rectflow.io import atomic_write_bytes

    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.is_file() else _HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_bytes(BENCHMARKS_MD, text.encode())


def env_lines(env: dict[str, Any]) -> str:
    return (
        f"Measured {env['date']} at commit `{env.get('commit')}` on {env['cpu']} ({env['cpus']} CPUs), "
        f"torch {env['torch']}, {env['torch_threads']} thread(s), device `{env['device']}`; "
        f"{load_line(env.get('loadavg') or [])}."
    )


def publish(name: str, data: dict[str, Any], md: str, quick: bool, section: bool = True) -> Path:
    """Write ``results/NAME.json``, replace NAME's section of BENCHMARKS.md (not for --quick), print."""
    path = write_result(name, data, quick=quick)
    if section and not quick:
        write_section(name, md)
    print(md)
    print(f"\nresults: {path}", file=sys.stderr)
    return path
