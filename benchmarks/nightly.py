"""Nightly retraining on data that shifts: ``schedule.on_new_data: finetune`` against ``retrain``.

For each seed: a workspace whose target is a folder of Parquet files (``inputs/days``) holding
night 1's data, N(0, I) → moons (``data.noise`` 0.05 level, 20,000 rows); ``rectflow run`` makes the
champion. Then night 2's file arrives: moons rotated by 30° and shifted by (0.5, 0) (10,000 rows), so
the data set is a mixture that moved (its drift is in the record). Each mode has its own workspace
(night 1 is deterministic, so both start from the same champion; the table shows its W2 in each):
night 2 runs once with ``retrain`` (every stage from scratch) and once with ``finetune``
(pretrain starts from the champion's flow for ``schedule.finetune_steps``; couple, reflow and
distill as always). Reported per mode: the wall time of night 2's ``rectflow run``, its pretrain's
seconds, and the W2 of the one-step model (1 NFE) to night 2's held-out rows, as evaluate measures it.

Run: ``python -m benchmarks.nightly [--quick] [--seeds 0 1 2]``; ``--quick`` is the tests' tiny size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.overhead import clone_worktree

NAME = "nightly"


@dataclass(frozen=True)
class NightlyConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    night1_rows: int = 20_000
    night2_rows: int = 10_000
    pretrain_steps: int = 3000
    finetune_steps: int = 750
    extra: tuple[str, ...] = field(default_factory=lambda: (
        "pretrain.checkpoint_every=1000", "couple.n_pairs=10000", "couple.shard_size=5000", "reflow.steps=1500",
        "distill.steps=1500", "evaluate.n_samples=2000",
        "evaluate.grid=[{models: flows, solver: euler, steps: [1, 4]}, {models: students, solver: euler}]",
    ))


QUICK = NightlyConfig(seeds=(0,), night1_rows=3000, night2_rows=1500, pretrain_steps=150, finetune_steps=40,
                      extra=tuple(__import__("tests.support.tiny", fromlist=["TINY"]).TINY))


def _moons(n: int, seed: int, angle_deg: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    from rectflow.data import generate_2d

    x = generate_2d("moons", n, seed)
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
    return x @ rot.T + np.asarray(shift, np.float32)


def _write_day(ws: Path, name: str, x: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (ws / "inputs" / "days").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": x[:, 0], "y": x[:, 1]}), ws / "inputs" / "days" / name)


def _run(ws: Path) -> tuple[dict[str, Any], float]:
    bin_dir = Path(sys.executable).parent
    t0 = time.perf_counter()
    r = subprocess.run([str(bin_dir / "rectflow"), "run"], cwd=ws, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"rectflow run in {ws} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]), seconds


def _one_step_w2(ws: Path) -> float:
    rows = json.loads((ws / "metrics" / "eval.json").read_text())["rows"]
    return float(next(r["w2"] for r in rows if r["model"] == "distilled" and r["nfe"] == 1))


def run_seed(cfg: NightlyConfig, seed: int, tmp: Path) -> dict[str, Any]:
    """Night 1 then night 2, in one workspace per mode (a copy would be another task to the registry,
    whose task names the data's absolute path, and so have no champion to fine-tune)."""
    from flows.pipeline import record_overrides

    out: dict[str, Any] = {"seed": seed}
    night2 = _moons(cfg.night2_rows, 2000 + seed, angle_deg=30.0, shift=(0.5, 0.0))
    for mode in ("retrain", "finetune"):
        ws = clone_worktree(tmp / f"seed{seed}-{mode}")
        record_overrides(ws / "params.yaml", [
            *cfg.extra, f"seed={seed}", "data.target=file", "data.target_path=inputs/days",
            f"pretrain.steps={cfg.pretrain_steps}", f"schedule.finetune_steps={cfg.finetune_steps}",
            f"schedule.on_new_data={mode}"])
        _write_day(ws, "night-1.parquet", _moons(cfg.night1_rows, 1000 + seed))
        _, first_s = _run(ws)
        first_w2 = _one_step_w2(ws)
        _write_day(ws, "night-2.parquet", night2)
        res, seconds = _run(ws)
        pre = json.loads((ws / "metrics" / "pretrain.json").read_text())
        data = json.loads((ws / "metrics" / "prepare.json").read_text()).get("data", {}).get("target", {})
        out[mode] = {"night1_seconds": first_s, "night1_w2": first_w2, "seconds": seconds,
                     "pretrain_seconds": pre.get("wall_seconds"), "pretrain_steps": pre["steps"],
                     "warm_start": (pre.get("warm_start") or {}).get("champion"), "w2": _one_step_w2(ws),
                     "drift": data.get("drift"), "promotion": res.get("promotion", {}).get("decision"),
                     "champion_w2": res.get("promotion", {}).get("previous_w2"),
                     "executed": res["executed"]}
        if mode == "finetune" and not out[mode]["warm_start"]:
            raise RuntimeError(f"seed {seed}: night 2 did not fine-tune (pretrain record: {pre})")
        print(f"[nightly] seed {seed} {mode}: night 2 {seconds:.0f} s, one-step W2 {out[mode]['w2']:.4f} "
              f"(night 1: {first_w2:.4f})", flush=True)
    return out


def markdown(data: dict[str, Any]) -> str:
    rows = data["result"]["seeds"]
    lines = ["## Nightly retraining on shifting data: finetune against retrain", "",
             f"`{data['command']}`. " + common.env_lines(data["environment"]), "",
             "Night 1: N(0, I) → moons, "
             f"{data['config']['night1_rows']} rows; night 2 adds {data['config']['night2_rows']} rows of moons "
             "rotated by 30° and shifted by (0.5, 0). Night 2 runs in each of two workspaces after night 1: "
             f"retrain (pretrain {data['config']['pretrain_steps']} steps from scratch) and finetune (pretrain "
             f"{data['config']['finetune_steps']} steps from the champion's flow); couple, reflow, distill and "
             "evaluate are the same in both. W2: the one-step model (1 NFE) to night 2's held-out rows.", ""]
    table = []
    for mode in ("retrain", "finetune"):
        secs = [r[mode]["seconds"] for r in rows]
        pre = [r[mode]["pretrain_seconds"] for r in rows]
        w2s = [r[mode]["w2"] for r in rows]
        table.append([mode, common.fmt_pm(secs, 1), common.fmt_pm(pre, 1), common.fmt_pm(w2s, 4)])
    lines.append(common.md_table(["night 2", "run wall s", "pretrain s", "one-step W2"], table))
    drift = [r["retrain"]["drift"]["w2"] for r in rows if r["retrain"].get("drift")]
    kept = [f"{r['seed']}/{m}: {r[m]['promotion']}" + (f" (night-1 champion {r[m]['champion_w2']:.4f})"
                                                        if r[m].get("champion_w2") is not None else "")
            for r in rows for m in ("retrain", "finetune")]
    lines += ["", "Promotion on night 2's held-out split (seed/mode: decision, the champion's W2 there): "
              + "; ".join(kept) + "."]
    lines += ["", f"Seeds {', '.join(str(r['seed']) for r in rows)}; mean ± std. Drift night 1 → 2 (W2 between "
              f"1000-row samples): {common.fmt_pm(drift, 3)}. Night 1's one-step W2: "
              f"{common.fmt_pm([r['retrain']['night1_w2'] for r in rows], 4)} (retrain's workspace), "
              f"{common.fmt_pm([r['finetune']['night1_w2'] for r in rows], 4)} (finetune's)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.nightly", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else NightlyConfig()
    if args.seeds:
        from dataclasses import replace

        cfg = replace(cfg, seeds=tuple(args.seeds))
    env = common.environment()
    with tempfile.TemporaryDirectory(prefix="rectflow-nightly-") as tmp:
        seeds = [run_seed(cfg, s, Path(tmp)) for s in cfg.seeds]
    command = ("python -m benchmarks.nightly " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    data = {"benchmark": NAME, "command": command, "config": asdict(cfg), "environment": env,
            "environment_after": {"loadavg": common.loadavg()}, "result": {"seeds": seeds}}
    common.publish(NAME, data, markdown(data), args.quick)
    return data


if __name__ == "__main__":
    main()
