"""Throughput at the limit: ``couple`` against the raw forward rate, training against a bare loop.

1. ``couple``: pairs per second of the couple stage (:func:`tasks.runner.run_stage` in a temporary
   workspace: the shard loop, Parquet writing, manifest) against its *limit*, the raw batched forward
   rate of the same network at the same batch size divided by the NFE per pair
   (``batch × forwards/s ÷ NFE``), measured in the same process just before and just after
   (the better of the two is the limit). Euler with 100 steps (NFE exactly 100) in fp32 and bf16
   autocast, and adaptive RK45 (limit from the measured NFE). ``--target digits``: the images
   profile's U-Net and round-1 solver (midpoint, 16 steps: NFE 32) at its batch, fp32 and bf16.
2. Training: samples per second of :func:`rectflow.train.train` (batch source, p(t), AdamW, warm-up,
   clipping, EMA, loss bookkeeping) against a bare loop of forward + MSE + backward + AdamW step on
   one fixed batch, same network, batch, optimizer and precision, same process, in ``repeats``
   interleaved rounds (bare, then rectflow). This VM's speed drifts by ±15% within a minute, so the
   figure is the median over rounds of the paired ratio rectflow / bare (each round's two runs see
   the same machine); the best of each over the rounds is reported beside it.

Run: ``python -m benchmarks.throughput [--quick]``. Only meaningful on a quiet machine: the load
average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "throughput"


@dataclass
class ThroughputConfig:
    target: str = "moons"
    pretrain_steps: int = 300  # a trained-ish field, so that RK45's NFE is realistic
    n_pairs: int = 50_000
    couple_batch: int = 10_000
    solver: str = "euler"  # the fixed-step solver of the couple cases (NFE per pair: steps × its stages)
    steps: int = 100
    rk45: bool = True
    bf16: bool = True
    train_steps: int = 400
    repeats: int = 15
    train_settings: tuple[tuple[int, int, int], ...] = ((256, 3, 1024), (64, 3, 512))  # hidden, depth, batch
    max_load: float = 0.5
    wait_s: float = 0.0


# The images profile's round 1 on digits: its U-Net at its batch (2500), 16 midpoint steps (NFE 32), fp32 and
# bf16 autocast (the profile's precision) on a briefly trained rf1 (the rate does not depend on the weights).
DIGITS = ThroughputConfig(target="digits", pretrain_steps=200, n_pairs=10_000, couple_batch=2500, solver="midpoint",
                          steps=16, rk45=False, bf16=True)

QUICK = ThroughputConfig(pretrain_steps=50, n_pairs=4000, couple_batch=2000, steps=20, rk45=True, bf16=False,
                         train_steps=40, repeats=1, train_settings=((64, 3, 256),))


# ---- couple --------------------------------------------------------------------------------------


def forward_rate(model, shape: tuple[int, ...], batch: int, precision: str, warmup_s: float = 1.5,
                 window_s: float = 0.6, windows: int = 5) -> float:
    """Samples per second of ``model(z, t)`` at ``batch`` under inference_mode (and bf16 autocast).

    The rate only settles after many calls (allocator, clocks: the first ~50 forwards at batch 10⁴
    run ~20% slower here), so: ``warmup_s`` of calls first, then the best of ``windows`` windows of
    ``window_s``. Each output is kept until the next call replaces it, as in a solver loop.
    """
    import torch

    dev = next(model.parameters()).device
    z = torch.randn(batch, *shape, device=dev)
    t = torch.rand(batch, device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    best = 0.0
    with torch.inference_mode(), autocast:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < warmup_s:
            out = model(z, t)
        common.sync(dev)
        for _ in range(windows):
            n, t0 = 0, time.perf_counter()
            while True:
                out = model(z, t)
                n += 1
                if n % 5 == 0:
                    common.sync(dev)
                    el = time.perf_counter() - t0
                    if el >= window_s:
                        break
            best = max(best, n * batch / el)
    del out
    return best


def couple_case(root: Path, base: list[str], solver: str, precision: str, cfg: ThroughputConfig, model, shape) -> dict[str, Any]:
    ov = base + [f"couple.solver={solver}", f"couple.steps={cfg.steps}", f"couple.precision={precision}"]
    shutil.rmtree(root / "data" / "couplings", ignore_errors=True)
    load_before = common.loadavg()
    lim_before = forward_rate(model, shape, cfg.couple_batch, precision)
    rec, wall = common.timed(common.run_stage, "couple", root, ov)
    lim_after = forward_rate(model, shape, cfg.couple_batch, precision)
    fwd = max(lim_before, lim_after)
    n_pairs = int(rec["n_pairs"])
    n_batches = sum(-(-rows // cfg.couple_batch) for rows in _shard_rows(n_pairs, cfg.couple_batch))
    nfe_per_batch = rec["nfe_total"] / max(1, n_batches)
    limit = fwd / nfe_per_batch
    solve_rate = rec.get("pairs_per_s") or n_pairs / max(rec.get("seconds") or wall, 1e-9)
    stage_rate = n_pairs / float(rec["wall_seconds"])
    return {
        "solver": solver, "precision": precision, "n_pairs": n_pairs, "batch": cfg.couple_batch,
        "nfe_per_pair": nfe_per_batch, "forward_samples_per_s": fwd,
        "forward_before_after": [lim_before, lim_after], "limit_pairs_per_s": limit,
        "couple_pairs_per_s": solve_rate, "couple_fraction_of_limit": solve_rate / limit,
        "stage_pairs_per_s": stage_rate, "stage_fraction_of_limit": stage_rate / limit,
        "stage_wall_seconds": float(rec["wall_seconds"]),
        "load_before": load_before, "load_after": common.loadavg(),
    }


def _shard_rows(n: int, shard: int) -> list[int]:
    full, rest = divmod(n, shard)
    return [shard] * full + ([rest] if rest else [])


def couple_benchmark(cfg: ThroughputConfig) -> list[dict[str, Any]]:
    from rectflow.models import load_model
    from rectflow.layout import Layout

    root = Path(tempfile.mkdtemp(prefix="rectflow-throughput-"))
    try:
        base = [
            f"data.target={cfg.target}", f"pretrain.steps={cfg.pretrain_steps}",
            f"couple.n_pairs={cfg.n_pairs}", f"couple.shard_size={cfg.couple_batch}",
            f"couple.batch_size={cfg.couple_batch}",
        ]
        common.run_stage("prepare", root, base)
        common.run_stage("pretrain", root, base)
        from rectflow.device import pick_device

        model, card = load_model(Layout(root).model("rf1"), pick_device())
        shape = tuple(card["arch"]["shape"])
        cases = ([(cfg.solver, "fp32")] + ([(cfg.solver, "bf16")] if cfg.bf16 else [])
                 + ([("rk45", "fp32")] if cfg.rk45 else []))
        out = []
        for solver, precision in cases:
            r = couple_case(root, base, solver, precision, cfg, model, shape)
            r["arch"] = card["arch"]
            out.append(r)
            print(f"[throughput] couple {solver}/{precision}: {r['couple_pairs_per_s']:,.0f} pairs/s, limit "
                  f"{r['limit_pairs_per_s']:,.0f} ({100 * r['couple_fraction_of_limit']:.1f}%)", file=sys.stderr, flush=True)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- training ------------------------------------------------------------------------------------


def bare_loop(hidden: int, depth: int, batch: int, steps: int, precision: str, lr: float, device) -> float:
    """Samples/s of forward + MSE + backward + AdamW step on one fixed batch (no data, no EMA, no clip)."""
    import torch

    from rectflow.nets import MLPVelocity

    torch.manual_seed(0)
    model = MLPVelocity((2,), hidden, depth, 64)
    x0 = torch.randn(batch, 2, device=device)
    x1 = torch.randn(batch, 2, device=device) + 2
    # as long a warm-up as train() gets from its own first steps
    return common.bare_train_rate(model, x0, x1, steps, max(10, steps // 3), precision, lr)


def pipeline_loop(hidden: int, depth: int, batch: int, steps: int, precision: str, device, workdir: Path) -> float:
    """Samples/s of :func:`rectflow.train.train` exactly as the pretrain stage runs it."""
    import torch

    from rectflow.data import Distribution, generate_2d
    from rectflow.nets import MLPVelocity

    target = Distribution((2,), torch.from_numpy(generate_2d("moons", 50_000, 0)))

    def make_model():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        return MLPVelocity((2,), hidden, depth, 64)

    return common.rectflow_train_rate(
        make_model, Distribution((2,)), target,
        [f"pretrain.batch_size={batch}", f"pretrain.precision={precision}", "pretrain.warmup=10"],
        steps, max(10, steps // 3), device, workdir)


def training_benchmark(cfg: ThroughputConfig) -> list[dict[str, Any]]:
    from rectflow.device import pick_device

    dev = pick_device()
    work = Path(tempfile.mkdtemp(prefix="rectflow-train-bench-"))
    out = []
    try:
        precisions = ["fp32"] + (["bf16"] if cfg.bf16 else [])
        for hidden, depth, batch in cfg.train_settings:
            for precision in precisions:
                load_before = common.loadavg()
                bare, piped = common.interleaved(  # each ratio pairs two neighbouring runs
                    lambda: bare_loop(hidden, depth, batch, cfg.train_steps, precision, 1e-3, dev),
                    lambda: pipeline_loop(hidden, depth, batch, cfg.train_steps, precision, dev, work), cfg.repeats)
                ratios = [p_ / b_ for p_, b_ in zip(piped, bare)]
                r = {
                    "hidden": hidden, "depth": depth, "batch": batch, "precision": precision, "steps": cfg.train_steps,
                    "bare_samples_per_s": statistics.median(bare), "train_samples_per_s": statistics.median(piped),
                    "fraction_of_bare": statistics.median(ratios), "fraction_best": max(piped) / max(bare),
                    "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3,
                    "bare_all": bare, "train_all": piped,
                    "load_before": load_before, "load_after": common.loadavg(),
                }
                out.append(r)
                print(f"[throughput] train {depth}×{hidden} b{batch} {precision}: {r['train_samples_per_s']:,.0f} vs bare "
                      f"{r['bare_samples_per_s']:,.0f} samples/s (median ratio {100 * r['fraction_of_bare']:.1f}%)",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# ---- report --------------------------------------------------------------------------------------


def _loads(r: dict[str, Any]) -> str:
    b, a = r.get("load_before") or [], r.get("load_after") or []
    return f"{b[0]:.2f} → {a[0]:.2f}" if b and a else "–"


def markdown(data: dict[str, Any]) -> str:
    env, cfg = data["environment"], data["config"]
    tag = data.get("title") or data.get("tag")
    lines = [
        f"## 2. Throughput{f' ({tag})' if tag else ''}", "",
        f"Reproduce: `{data['command']}`", "",
        common.env_lines(env) + f" Load after: {common.load_line(data['environment_after']['loadavg'])}.", "",
    ]
    if data["couple"]:
        lines += _couple_lines(data, cfg)
    if data["training"]:
        lines += _training_lines(data, cfg)
    if data.get("notes"):
        lines += [f"Note: {n}" for n in data["notes"]]
    return "\n".join(lines).rstrip("\n")


def _couple_lines(data: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    lines = [
        f"**couple** ({cfg['n_pairs']} pairs of a 1-RF on {cfg['target']} trained {cfg['pretrain_steps']} steps, "
        f"batch {cfg['couple_batch']}). Limit = forward samples/s of the same network at the same batch in the same "
        "process ÷ NFE per pair. `couple` = the stage's own pairs/s (solve + Parquet shards + manifest); "
        "`stage` = pairs ÷ the whole stage's wall time (model loading, source sampling, final rename too).", "",
    ]
    rows = []
    for r in data["couple"]:
        rows.append([
            f"{r['solver']} {r['precision']}", f"{r['nfe_per_pair']:.0f}", f"{r['forward_samples_per_s']:,.0f}",
            f"{r['limit_pairs_per_s']:,.0f}", f"{r['couple_pairs_per_s']:,.0f}",
            f"{100 * r['couple_fraction_of_limit']:.1f}%", f"{100 * r['stage_fraction_of_limit']:.1f}%", _loads(r),
        ])
    lines += [common.md_table(["solver", "NFE/pair", "forward samples/s", "limit pairs/s", "couple pairs/s",
                               "couple / limit (≥ 90%)", "stage / limit", "1-min load before → after"], rows), ""]
    return lines


def _training_lines(data: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    lines = [
        f"**Training** ({cfg['train_steps']} steps a run, {cfg['repeats']} interleaved rounds of bare then rectflow; "
        "samples/s: medians over the rounds; rectflow / bare: the median of the rounds' paired ratios, with its "
        "quartiles, and the best run of each). Bare loop: forward + "
        "MSE + backward + AdamW step on one fixed batch. rectflow: `rectflow.train.train` as the pretrain stage "
        "runs it (fresh Gaussian × moons pairs every step, p(t), warm-up, grad clipping, EMA, loss bookkeeping).", "",
    ]
    rows = []
    for r in data["training"]:
        q = r.get("ratio_quartiles")
        rows.append([
            f"{r['depth']}×{r['hidden']}", r["batch"], r["precision"], f"{r['bare_samples_per_s']:,.0f}",
            f"{r['train_samples_per_s']:,.0f}", f"**{100 * r['fraction_of_bare']:.1f}%**",
            f"{100 * q[0]:.1f}–{100 * q[2]:.1f}%" if q else "–",
            f"{100 * r['fraction_best']:.1f}%" if "fraction_best" in r else "–", _loads(r),
        ])
    lines += [common.md_table(["MLP", "batch", "precision", "bare samples/s", "rectflow samples/s",
                               "rectflow / bare (≥ 90%)", "quartiles", "best / best", "1-min load before → after"], rows), ""]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--wait-for-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to SECONDS for the 1-minute load to drop below --max-load first")
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--require-quiet", action="store_true",
                    help="measure nothing (exit 3) if the load is still at or above --max-load after waiting")
    ap.add_argument("--target", choices=["moons", "digits"], default="moons",
                    help="digits: couple with the images profile's U-Net and round-1 solver (batch 2500, 16 midpoint steps, fp32 and bf16)")
    ap.add_argument("--skip-couple", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--tag", default=None, help="a variant's name (e.g. gpu): results throughput-TAG.json, its own section "
                    "(default with --target digits: digits, so the moons section stays)")
    ap.add_argument("--report-only", type=Path, default=None, metavar="JSON", help="no run: re-render a saved result")
    args = ap.parse_args(argv)
    if args.tag is None and args.target != "moons":
        args.tag = args.target
    if args.report_only:
        data = json.loads(args.report_only.read_text())
        name = NAME + (f"-{data['tag']}" if data.get("tag") else "")
        common.write_result(name, data)
        common.write_section(name, markdown(data))
        print(markdown(data))
        return data
    if args.target == "digits":
        base = replace(DIGITS, pretrain_steps=20, n_pairs=500, couple_batch=250, steps=3) if args.quick else DIGITS
    else:
        base = QUICK if args.quick else ThroughputConfig()
    cfg = replace(base, max_load=args.max_load, wait_s=args.wait_for_quiet)
    common.set_threads()
    if cfg.wait_s > 0 or args.require_quiet:
        load = common.wait_for_quiet(cfg.max_load, cfg.wait_s)
        if args.require_quiet and load and load[0] >= cfg.max_load:
            print(f"[throughput] load {load[0]:.2f} ≥ {cfg.max_load}: not measuring", file=sys.stderr)
            raise SystemExit(3)
    env = common.environment()
    couple = [] if args.skip_couple else couple_benchmark(cfg)
    training = [] if args.skip_training else training_benchmark(cfg)
    command = ("python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    data = {"benchmark": NAME, "command": command, "config": asdict(cfg), "environment": env,
            "environment_after": {"loadavg": common.loadavg()}, "couple": couple, "training": training,
            "tag": args.tag}
    md = markdown(data)
    name = NAME + (f"-{args.tag}" if args.tag else "")
    path = common.write_result(name, data, quick=args.quick)
    if not args.quick:
        common.write_section(name, md)
    print(md)
    print(f"\nresults: {path}", file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
