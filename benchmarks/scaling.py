"""Scaling out: ``couple`` on 1 vs 2 Dask workers, and peak memory of ``reflow`` vs the number of pairs.

1. ``couple`` pairs per second with ``couple.workers=1`` (in process, torch on every core) and
   ``couple.workers=2`` (a local Dask cluster through Prefect's DaskTaskRunner: two processes of one
   thread each), default params otherwise (50k pairs in 10k-pair shards), Euler with 100 steps and
   adaptive RK45, each as a fresh ``rectflow stage couple`` process. Reported: the stage's own rate
   (pairs ÷ the generation phase, Dask start-up included), the process's wall time, and for Dask the
   start-up breakdown the stage prints (temporary Prefect server, cluster, first shard, teardown).
   The shards' sha256 are compared between the two runs (they must be equal).
2. Peak resident memory of ``rectflow stage reflow`` (the whole stage: training rf2 on round 1, then
   coupling round 2) on 0.5M and 2M pairs of the default data, pairs made with a cheap solver
   (Euler, 4 steps: the question is streaming, not pair quality), a few hundred reflow steps.
   Kernel figure from ``/usr/bin/time -v``, plus the peak per phase (training, coupling) from
   polling the process's RSS.

Run: ``python -m benchmarks.scaling [--quick] [--skip-couple] [--skip-memory]``. Timings depend on
the load (recorded beside each one); memory figures do not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "scaling"
BIN = Path(sys.executable).parent


@dataclass
class ScalingConfig:
    pretrain_steps: int = 300  # a trained-ish rf1, so that RK45's NFE is realistic
    model: tuple[str, ...] = ()  # model overrides (default: params.yaml's)
    n_pairs: int = 50_000
    euler_steps: int = 100
    rk45: bool = True
    workers: tuple[int, ...] = (1, 2)
    memory_pairs: tuple[int, ...] = (500_000, 2_000_000)
    memory_solver_steps: int = 4
    reflow_steps: int = 300
    poll_s: float = 0.05


QUICK = ScalingConfig(pretrain_steps=30, model=("model.hidden=64", "model.depth=2"), n_pairs=4000, euler_steps=10,
                      rk45=False, memory_pairs=(20_000, 40_000), reflow_steps=20)


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("PREFECT_HOME", str(home / "prefect-home"))  # not the user's database unless asked
    env.pop("RECTFLOW_LOCK_HELD", None)
    return env


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _stage(stage: str, ws: Path, overrides: list[str], env: dict[str, str]) -> tuple[dict[str, Any], str, float]:
    cmd = [str(BIN / "rectflow"), "stage", stage, *_sets(overrides)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr, wall


def _base_workspace(root: Path, cfg: ScalingConfig) -> tuple[Path, list[str]]:
    """data/prepared + models/rf1 (default data and model, ``pretrain_steps`` steps), in process."""
    base = [f"pretrain.steps={cfg.pretrain_steps}", f"pretrain.checkpoint_every={max(cfg.pretrain_steps, 1)}",
            *cfg.model]
    ws = root / "base"
    ws.mkdir(parents=True)
    shutil.copy(common.PARAMS, ws / "params.yaml")
    common.run_stage("prepare", ws, base)
    common.run_stage("pretrain", ws, base)
    return ws, base


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns(".rectflow"))
    return dst


_TIMINGS = re.compile(r"Dask timings \(s\): (.*)")


def couple_benchmark(cfg: ScalingConfig, root: Path, base_ws: Path, base: list[str]) -> list[dict[str, Any]]:
    rows = []
    solvers = [("euler", ["couple.solver=euler", f"couple.steps={cfg.euler_steps}"])]
    if cfg.rk45:
        solvers.append(("rk45", ["couple.solver=rk45"]))
    env = _env(root)
    for solver, sov in solvers:
        shas: dict[int, dict[str, str]] = {}
        for workers in cfg.workers:
            ws = _copy(base_ws, root / f"couple-{solver}-{workers}")
            load_before = common.loadavg()
            rec, err, wall = _stage("couple", ws, [*base, f"couple.n_pairs={cfg.n_pairs}", *sov,
                                                    f"couple.workers={workers}"], env)
            load_after = common.loadavg()
            man = json.loads((ws / "data/couplings/round-1/manifest.json").read_text())
            shas[workers] = {e["name"]: e["sha256"] for e in man["shards"]}
            m = _TIMINGS.search(err)
            dask = {k: float(v) for k, v in (kv.split(" ") for kv in m.group(1).split(", "))} if m else None
            row = {"solver": solver, "workers": workers, "n_pairs": rec["n_pairs"], "shards": rec["shards"],
                   "nfe_per_pair": rec["nfe_total"] / rec["shards"], "generation_s": rec["seconds"],
                   "pairs_per_s": rec["pairs_per_s"], "stage_wall_s": round(wall, 2), "dask": dask,
                   "loadavg_before": load_before, "loadavg_after": load_after}
            if dask:  # the rate once the workers are solving: from the first task's start
                busy = dask["last_shard"] - dask["first_task_start"]
                row["pairs_per_s_after_startup"] = round(rec["n_pairs"] / busy, 1) if busy > 0 else None
            rows.append(row)
            print(f"[bench] couple {solver} workers={workers}: {row['pairs_per_s']} pairs/s "
                  f"(generation {rec['seconds']:.1f} s, stage {wall:.1f} s), load {load_before}", file=sys.stderr)
            shutil.rmtree(ws, ignore_errors=True)
        same = len({json.dumps(s, sort_keys=True) for s in shas.values()}) == 1
        for row in rows:
            if row["solver"] == solver:
                row["sha256_equal_across_workers"] = same
        if not same:
            raise RuntimeError(f"couple {solver}: shards differ between worker counts {list(shas)}")
    return rows


def _peak_rss(cmd: list[str], ws: Path, env: dict[str, str], poll_s: float, phase_marker: str) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v``; the kernel's max RSS, and the polled peak RSS before
    and after the first stderr line containing ``phase_marker``."""
    import psutil

    report = ws / "time-v.txt"
    timev = Path("/usr/bin/time")
    full = [str(timev), "-v", "-o", str(report), *cmd] if timev.is_file() else cmd
    proc = subprocess.Popen(full, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}
    tail: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if phase_marker in line and "phase2" not in marks:
                marks["phase2"] = time.perf_counter()
            tail.append(line)
            del tail[:-200]

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    samples: list[tuple[float, int]] = []
    top = psutil.Process(proc.pid)
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            procs = [top, *top.children(recursive=True)]
            rss = max(p.memory_info().rss for p in procs)
            samples.append((time.perf_counter(), rss))
        except psutil.Error:
            pass
        time.sleep(poll_s)
    out = proc.stdout.read() if proc.stdout else ""
    reader.join(timeout=10)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(tail)[-3000:]}")
    split = marks.get("phase2", float("inf"))
    kernel = None
    if report.is_file():
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())
        kernel = int(m.group(1)) * 1024 if m else None
    mib = 1024 * 1024
    return {
        "max_rss_mib": round(kernel / mib, 1) if kernel else None,
        "polled_peak_mib": round(max(r for _, r in samples) / mib, 1) if samples else None,
        "polled_peak_train_mib": round(max((r for t, r in samples if t < split), default=0) / mib, 1),
        "polled_peak_couple_mib": round(max((r for t, r in samples if t >= split), default=0) / mib, 1),
        "samples": len(samples), "wall_s": round(wall, 2), "record": json.loads(out.strip().splitlines()[-1]),
    }


def memory_benchmark(cfg: ScalingConfig, root: Path, base_ws: Path, base: list[str]) -> list[dict[str, Any]]:
    rows = []
    env = _env(root)
    for n in cfg.memory_pairs:
        ws = _copy(base_ws, root / f"memory-{n}")
        over = [*base, f"couple.n_pairs={n}", "couple.solver=euler", f"couple.steps={cfg.memory_solver_steps}",
                f"reflow.steps={cfg.reflow_steps}", f"reflow.checkpoint_every={cfg.reflow_steps}"]
        rec, _err, wall = _stage("couple", ws, over, env)
        shard_bytes = sum(p.stat().st_size for p in (ws / "data/couplings/round-1").glob("shard-*.parquet"))
        load = common.loadavg()
        m = _peak_rss([str(BIN / "rectflow"), "stage", "reflow", *_sets(over)], ws, env, cfg.poll_s,
                      phase_marker="[couple] round 2")
        train = m["record"]
        rows.append({"n_pairs": n, "shards": rec["shards"], "pairs_on_disk_mib": round(shard_bytes / 2**20, 1),
                     "couple_wall_s": round(wall, 1), "reflow_wall_s": m["wall_s"], "reflow_steps": cfg.reflow_steps,
                     "max_rss_mib": m["max_rss_mib"], "polled_peak_mib": m["polled_peak_mib"],
                     "polled_peak_train_mib": m["polled_peak_train_mib"],
                     "polled_peak_couple_mib": m["polled_peak_couple_mib"], "rss_samples": m["samples"],
                     "loadavg": load, "reflow_record": {k: v for k, v in train.items() if not isinstance(v, (dict, list))}})
        print(f"[bench] reflow on {n} pairs: max RSS {m['max_rss_mib']} MiB (train {m['polled_peak_train_mib']}, "
              f"couple {m['polled_peak_couple_mib']})", file=sys.stderr)
        shutil.rmtree(ws, ignore_errors=True)
    return rows


def _fmt_load(load: list[float] | None) -> str:
    return " / ".join(f"{x:.2f}" for x in load) if load else "?"


def markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    out = ["## Scaling out: Dask workers for `couple`, memory of `reflow`", "",
           f"Command: `{data['command']}`. " + common.env_lines(env), ""]
    if data["couple"]:
        out += ["### `couple`: pairs per second, 1 vs 2 workers", "",
                f"Default params ({data['config']['n_pairs']:,} pairs in shards of params.yaml's size, rf1 of "
                f"{data['config']['pretrain_steps']} pretrain steps), each run a fresh `rectflow stage couple`. "
                "1 worker: in process, torch on every core. 2 workers: a local Dask cluster (2 processes × 1 thread) "
                "through Prefect's DaskTaskRunner; its pairs/s includes the start-up (temporary Prefect server, "
                "cluster, worker imports); \"after start-up\" counts from the first task's start to the last shard. "
                "The machine has 2 cores either way, and is shared: load averages are given per run.", ""]
        rows = []
        for r in data["couple"]:
            d = r.get("dask") or {}
            startup = (f"Prefect API {d.get('prefect_api', 0):.1f}, flow call → first task running "
                       f"{d.get('first_task_start', 0):.1f}, teardown {d.get('teardown', 0):.1f}") if d else "–"
            rows.append([r["solver"], r["workers"], f"{r['nfe_per_pair']:.0f}", f"{r['pairs_per_s']:,.0f}",
                         f"{r['pairs_per_s_after_startup']:,.0f}" if r.get("pairs_per_s_after_startup") else "–",
                         f"{r['generation_s']:.1f}", f"{r['stage_wall_s']:.1f}", startup,
                         _fmt_load(r["loadavg_before"]), "yes" if r.get("sha256_equal_across_workers") else "NO"])
        out += [common.md_table(["solver", "workers", "NFE/pair", "pairs/s", "pairs/s after start-up",
                                 "generation s", "stage wall s", "Dask start-up (s)", "load before (1/5/15 min)",
                                 "shards identical"], rows), ""]
    if data["memory"]:
        out += ["### `reflow`: peak resident memory vs number of pairs", "",
                f"`rectflow stage reflow` on pairs made with Euler, {data['config']['memory_solver_steps']} steps "
                f"(cheap: the question is streaming), {data['config']['reflow_steps']} reflow steps, then the stage "
                "couples round 2 from rf2 with the same settings. Max RSS from `/usr/bin/time -v`; the per-phase "
                "peaks from polling RSS every "
                f"{data['config']['poll_s'] * 1000:.0f} ms.", ""]
        rows = [[f"{r['n_pairs']:,}", r["shards"], r["pairs_on_disk_mib"], r["max_rss_mib"], r["polled_peak_train_mib"],
                 r["polled_peak_couple_mib"], r["reflow_wall_s"], _fmt_load(r["loadavg"])] for r in data["memory"]]
        out += [common.md_table(["pairs", "shards", "pairs on disk (MiB)", "max RSS (MiB)", "peak while training (MiB)",
                                 "peak while coupling (MiB)", "stage wall s", "load"], rows), ""]
        if len(data["memory"]) >= 2:
            a, b = data["memory"][0], data["memory"][-1]
            out += [f"From {a['n_pairs']:,} to {b['n_pairs']:,} pairs ({b['n_pairs'] / a['n_pairs']:.0f}×, "
                    f"{b['pairs_on_disk_mib'] - a['pairs_on_disk_mib']:.0f} MiB more on disk) the peak changes by "
                    f"{b['max_rss_mib'] - a['max_rss_mib']:+.1f} MiB.", ""]
    for note in data.get("notes", []):  # added by hand to a saved result (then --report-only)
        out += [f"Note: {note}", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-couple", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--report-only", type=Path, default=None, metavar="JSON", help="no run: re-render a saved result")
    args = ap.parse_args(argv)
    if args.report_only:
        data = json.loads(args.report_only.read_text())
        common.write_result(NAME, data)
        common.write_section(NAME, markdown(data))
        print(markdown(data))
        return data
    cfg = QUICK if args.quick else ScalingConfig()
    common.set_threads()
    env = common.environment()
    with tempfile.TemporaryDirectory(prefix="rectflow-scaling-") as tmp:
        root = Path(tmp)
        base_ws, base = _base_workspace(root, cfg)
        couple = [] if args.skip_couple else couple_benchmark(cfg, root, base_ws, base)
        memory = [] if args.skip_memory else memory_benchmark(cfg, root, base_ws, base)
    command = ("python -m benchmarks.scaling " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    data = {"benchmark": NAME, "command": command, "config": asdict(cfg), "environment": env,
            "environment_after": {"loadavg": common.loadavg()}, "couple": couple, "memory": memory}
    md = markdown(data)
    common.publish(NAME, data, md, args.quick)
    return data


if __name__ == "__main__":
    main()
