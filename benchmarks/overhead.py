"""Orchestration overhead: wall time of ``rectflow run`` (what ``make run`` runs) against its compute.

Copies the working tree (tracked and untracked-not-ignored files: no data, models, metrics, venv)
into a temporary directory, makes it a git repository (DVC needs one), and runs
``rectflow run [--set ...]`` there as ``make run`` does, timing the whole process. The stages' own
compute is the sum of ``wall_seconds`` over ``metrics/<stage>.json`` (each stage's ``run`` as timed
by :func:`tasks.runner.run_stage`); the difference is what Prefect (ephemeral server, task
orchestration), DVC (``dvc repro`` per stage: hashing, a fresh ``rectflow stage`` process with its
imports) and MLflow (runs, artifacts, model registry) add. A second ``rectflow run`` with nothing
changed (every stage skipped) shows the fixed cost alone.

Run: ``python -m benchmarks.overhead [--quick] [--set KEY=VALUE ...]``. The default is the
``params.yaml`` pipeline exactly as ``make run`` runs it; ``--quick`` a tiny one (the tests' setting).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from rectflow.stages import PIPELINE as STAGES
from tests.support.tiny import TINY

NAME = "overhead"



def clone_worktree(dest: Path) -> Path:
    """Copy the tracked and untracked-not-ignored files of the repository to ``dest``; git-init it."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=common.ROOT,
        capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = common.ROOT / rel
        if not src.is_file() or rel.startswith("benchmarks/results/"):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    env = _git_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "benchmark snapshot"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def _git_env() -> dict[str, str]:
    return os.environ | {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                         "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}


def rectflow_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("rectflow")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "flows.cli"]


def run_pipeline(work: Path, sets: list[str], timeout: float) -> dict[str, Any]:
    cmd = rectflow_cmd() + ["run"] + [a for s in sets for a in ("--set", s)]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RECTFLOW_THREADS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    return {"returncode": proc.returncode, "wall_seconds": wall, "stdout_tail": proc.stdout[-3000:],
            "stderr_tail": proc.stderr[-3000:]}


def stage_seconds(work: Path) -> dict[str, float]:
    out = {}
    for s in STAGES:
        path = work / "metrics" / f"{s}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            if "wall_seconds" in rec:
                out[s] = float(rec["wall_seconds"])
    return out


def measure(sets: list[str], timeout: float, keep: bool = False) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="rectflow-overhead-"))
    try:
        clone_worktree(work)
        first = run_pipeline(work, sets, timeout)
        compute = stage_seconds(work)
        result: dict[str, Any] = {"first": first, "stage_wall_seconds": compute}
        if first["returncode"] != 0:
            result["error"] = "rectflow run failed"
            return result
        total = sum(compute.values())
        result |= {
            "compute_seconds": total,
            "overhead_seconds": first["wall_seconds"] - total,
            "overhead_fraction": (first["wall_seconds"] - total) / first["wall_seconds"],
            "missing_stages": [s for s in STAGES if s not in compute],
        }
        before = {s: (work / "metrics" / f"{s}.json").stat().st_mtime for s in compute}
        second = run_pipeline(work, sets, timeout)
        rerun = [s for s in compute if (work / "metrics" / f"{s}.json").stat().st_mtime != before[s]]
        result["noop_rerun"] = second | {"stages_rerun": rerun}
        return result
    finally:
        if keep:
            print(f"[overhead] workspace kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def markdown(data: dict[str, Any]) -> str:
    r, env = data["result"], data["environment"]
    lines = [
        "## 3. Overhead of the orchestration", "",
        f"Reproduce: `{data['command']}`", "",
        common.env_lines(env) + f" Load after: {common.load_line(data['environment_after']['loadavg'])}.", "",
        "`rectflow run` (Prefect flow, DVC per stage, MLflow tracking) in a fresh copy of the working tree, "
        "timed as a whole process, against the sum of the stages' `wall_seconds` from `metrics/*.json`."
        + (f" Overrides: `{' '.join(data['sets'])}`." if data["sets"] else " Settings: `params.yaml` as `make run` uses it."),
        "",
    ]
    if "error" in r:
        lines += [f"**Not measured**: `rectflow run` exited with status {r['first']['returncode']}.", "",
                  "```", r["first"]["stderr_tail"][-1500:], "```"]
        return "\n".join(lines)
    rows = [[s, f"{v:.1f}"] for s, v in r["stage_wall_seconds"].items()]
    rows += [["**sum of stages**", f"{r['compute_seconds']:.1f}"],
             ["**`rectflow run` wall**", f"{r['first']['wall_seconds']:.1f}"],
             ["**overhead**", f"{r['overhead_seconds']:.1f} ({100 * r['overhead_fraction']:.1f}% of the run; goal ≤ 10%)"],
             ["no-op rerun (everything skipped) wall", f"{r['noop_rerun']['wall_seconds']:.1f} "
              f"(stages rerun: {r['noop_rerun']['stages_rerun'] or 'none'})"]]
    lines += [common.md_table(["what", "seconds"], rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tests' tiny pipeline")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE passed to rectflow run")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--wait-for-quiet", type=float, default=0.0, metavar="SECONDS")
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--require-quiet", action="store_true",
                    help="measure nothing (exit 3) if the load is still at or above --max-load after waiting")
    args = ap.parse_args(argv)
    sets = (TINY if args.quick else []) + args.sets
    if args.wait_for_quiet > 0 or args.require_quiet:
        load = common.wait_for_quiet(args.max_load, args.wait_for_quiet)
        if args.require_quiet and load and load[0] >= args.max_load:
            print(f"[overhead] load {load[0]:.2f} ≥ {args.max_load}: not measuring", file=sys.stderr)
            raise SystemExit(3)
    env = common.environment()
    result = measure(sets, args.timeout, args.keep)
    command = ("python -m benchmarks.overhead " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    data = {"benchmark": NAME, "command": command, "sets": sets, "environment": env,
            "environment_after": {"loadavg": common.loadavg()}, "result": result}
    md = markdown(data)
    common.publish(NAME, data, md, args.quick, section="error" not in result)
    return data


if __name__ == "__main__":
    main()
