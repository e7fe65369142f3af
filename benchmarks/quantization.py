"""Quantization: latency per sample, bytes on disk and ΔW2 of the int8, int4 and bf16 one-step models.

Trains the chain (prepare → pretrain → couple → reflow → distill) on N→moons in a temporary
workspace with the architecture of ``params.yaml``, runs the ``quantize`` stage (which measures the
int8 backends and records its choice) and the ``evaluate`` stage restricted to the students (what
``metrics/eval.json`` reports: W2, latency, bytes), then measures each variant again more carefully:
one-step generation ``x1 = z0 + v(z0, 0)`` at batch 1024 (and batch 1), best of ``repeats``, same
noise for all; W2 against the same held-out samples; bytes of ``NAME.safetensors``. Both int8
compute backends (torchao weight-only, torch.ao dynamic) are timed on the same int8 weights, and
both int4 ones (the x86 int4 kernel, weights dequantized at load) on the same int4 weights; the
int4 kernel's forward at batch 1024 is profiled (``torch.profiler``: where its time goes). One
workspace per seed; the table gives mean ± std over seeds.

Run: ``python -m benchmarks.quantization [--quick] [--seeds 0 1 2]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "quantization"


@dataclass
class QuantConfig:
    target: str = "moons"
    steps: int = 1500
    n_pairs: int = 20_000
    n_eval: int = 2000
    batch: int = 1024
    repeats: int = 30
    seeds: tuple[int, ...] = (0, 1, 2)
    extra: tuple[str, ...] = ()


QUICK = QuantConfig(steps=100, n_pairs=2000, n_eval=500, repeats=3, seeds=(0,),
                    extra=("couple.solver=euler", "couple.steps=20"))


def latencies(models: dict[str, Any], z, repeats: int, warmup: int = 3) -> dict[str, float]:
    """ms per sample of one Euler step from ``z`` (the one-step generator) for each model.

    The models are timed in turn within each repeat (round robin) and the best of ``repeats`` is
    kept, so that a burst of load on the machine hits every variant alike.
    """
    import time

    import torch

    from rectflow.solvers import solve

    best = {name: float("inf") for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                solve(model, z, "euler", 1)
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                solve(model, z, "euler", 1)
                best[name] = min(best[name], time.perf_counter() - t0)
    return {name: 1000.0 * b / len(z) for name, b in best.items()}


def profile_top(model: Any, z: Any, top: int = 8) -> list[dict[str, Any]]:
    """The ``top`` operators of one forward by self CPU time (ms) and their share of the total."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    t = torch.zeros(len(z))
    with torch.inference_mode():
        model(z, t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(z, t)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1000.0,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


def run(cfg: QuantConfig, seed: int = 0) -> dict[str, Any]:
    import torch

    from rectflow.params import load_params
    from rectflow.data import load_prepared
    from rectflow.layout import Layout
    from rectflow.metrics import w2
    from rectflow.nets import build_model, load_state, read_model_card
    from rectflow.models import load_model
    from rectflow.quant import apply_backend, build_int4, dequantize_state
    from rectflow.solvers import solve
    from tasks.evaluate import eval_noise

    root = Path(tempfile.mkdtemp(prefix="rectflow-quant-"))
    try:
        ov = [
            f"seed={seed}", f"data.target={cfg.target}", f"pretrain.steps={cfg.steps}", f"reflow.steps={cfg.steps}",
            f"distill.steps={cfg.steps}", f"couple.n_pairs={cfg.n_pairs}",
            f"couple.shard_size={min(cfg.n_pairs, 10_000)}", f"couple.batch_size={min(cfg.n_pairs, 10_000)}",
            f"evaluate.n_samples={cfg.n_eval}", f"evaluate.latency_batch={cfg.batch}",
            "evaluate.grid=[{models: students, solver: euler}]", "quantize.variants=[int8, int4, bf16, fp8]",
            *cfg.extra,
        ]
        for stage in ("prepare", "pretrain", "couple", "reflow", "distill"):
            common.run_stage(stage, root, ov)
        qrec = common.run_stage("quantize", root, ov)
        erec = common.run_stage("evaluate", root, ov)
        lay = Layout(root)
        eval_rows = json.loads((lay.metrics / "eval.json").read_text())["rows"]

        p = load_params(common.PARAMS, ov)
        test = load_prepared(lay.prepared, "target", "test")
        n = min(cfg.n_eval, len(test.data))
        ref, shape = test.data[:n], tuple(test.shape)
        z_eval = eval_noise(p, lay, n, shape)
        z_lat = torch.randn(cfg.batch, *shape, generator=torch.Generator().manual_seed(1))
        z_one = z_lat[:1]

        variants: dict[str, Any] = {}
        for name in ("distilled", "distilled-int8", "distilled-int4", "distilled-bf16", "distilled-fp8"):
            variants[name] = load_model(lay.model(name), "cpu")[0]
        # both int8 compute paths on the same int8 weights
        card8 = read_model_card(lay.model("distilled-int8"))
        deq = build_model(card8["arch"])
        deq.load_state_dict(dequantize_state(load_state(lay.model("distilled-int8"))))
        deq.eval()
        for backend in ("torchao", "dynamic"):
            try:
                variants[f"distilled-int8 [{backend}]"] = apply_backend(deq, backend)
            except Exception as e:  # not available on this build
                print(f"[quantization] int8 backend {backend} unavailable: {e}", file=sys.stderr)
        card4 = read_model_card(lay.model("distilled-int4"))
        state4 = load_state(lay.model("distilled-int4"))
        for backend in ("int4pack", "dequant"):  # both int4 compute paths on the same int4 weights
            try:
                variants[f"distilled-int4 [{backend}]"] = build_int4(card4, state4, backend, lay.model("distilled-int4"))
            except (RuntimeError, NotImplementedError, AttributeError) as e:
                print(f"[quantization] int4 backend {backend} unavailable: {e}", file=sys.stderr)
        prof = (profile_top(variants["distilled-int4 [int4pack]"], z_lat)
                if "distilled-int4 [int4pack]" in variants else [])

        rows = []
        lat_big = latencies(variants, z_lat, cfg.repeats)
        lat_one = latencies(variants, z_one, cfg.repeats * 10)
        with torch.inference_mode():
            x_ref = solve(variants["distilled"], z_eval, "euler", 1).x.float()
            w2_fp32 = w2(x_ref, ref)
            for name, model in variants.items():
                x = solve(model, z_eval, "euler", 1).x.float()
                file_name = name.split(" ")[0]
                rows.append({
                    "model": name,
                    "bytes": lay.model(file_name).with_suffix(".safetensors").stat().st_size,
                    "latency_ms_per_sample_b1024": lat_big[name],
                    "latency_ms_per_sample_b1": lat_one[name],
                    "w2": w2(x, ref),
                    "delta_w2": w2(x, ref) - w2_fp32,
                    "max_abs_sample_change": float((x - x_ref).abs().max()),
                })
                print(f"[quantization] {name}: {rows[-1]['latency_ms_per_sample_b1024'] * 1000:.2f} µs/sample, "
                      f"{rows[-1]['bytes']} B, ΔW2 {rows[-1]['delta_w2']:+.4f}", file=sys.stderr, flush=True)
        fp = next(r for r in rows if r["model"] == "distilled")
        for r in rows:
            r["speedup_b1024"] = fp["latency_ms_per_sample_b1024"] / r["latency_ms_per_sample_b1024"]
            r["size_ratio"] = r["bytes"] / fp["bytes"]
        return {
            "seed": seed, "rows": rows, "arch": card8["arch"], "chosen_backend": card8["meta"].get("backend"),
            "chosen_int4_backend": card4["meta"].get("backend"), "int4_awq_alpha": {
                k: v["alpha"] for k, v in card4["meta"].get("awq_layers", {}).items()},
            "int4_kernel_profile_b1024": prof,
            "quantize_stage": qrec, "eval_rows": [r for r in eval_rows if r["model"].startswith("distilled")],
            "evaluate_summary": {k: v for k, v in erec.items() if not isinstance(v, (dict, list))},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def markdown(data: dict[str, Any]) -> str:
    cfg, env = data["config"], data["environment"]
    runs = data["result"]["runs"]
    arch = runs[0]["arch"]
    lines = [
        "## 4. Quantization", "",
        f"Reproduce: `{data['command']}`", "",
        common.env_lines(env) + f" Load after: {common.load_line(data['environment_after']['loadavg'])}.", "",
        f"One-step student (2-RF + distill) of N→{cfg['target']}, MLP {arch.get('depth')}×{arch.get('hidden')}, "
        f"{cfg['steps']} steps per stage, seeds {', '.join(str(r['seed']) for r in runs)} (mean ± std). Latency: one "
        f"Euler step (NFE 1) per sample, at batch {cfg['batch']} (best of {cfg['repeats']}) and at batch 1 (best of "
        f"{10 * cfg['repeats']}), the variants timed in turn. ΔW2 against the fp32 model on the same {cfg['n_eval']} "
        f"noise draws and held-out samples (relative: ΔW2 / W2 of fp32). The quantize stage's measured choices: int8 "
        f"`{', '.join(r['chosen_backend'] for r in runs)}`, int4 `{', '.join(str(r['chosen_int4_backend']) for r in runs)}`"
        f" (int4: group 32, AWQ α per layer {runs[0]['int4_awq_alpha']} for seed {runs[0]['seed']}).", "",
    ]
    table = []
    for name in [r["model"] for r in runs[0]["rows"]]:
        rs = [next(x for x in r["rows"] if x["model"] == name) for r in runs if any(x["model"] == name for x in r["rows"])]
        table.append([
            name, f"{rs[0]['bytes']:,}", f"{rs[0]['size_ratio']:.3f}",
            common.fmt_pm([r["latency_ms_per_sample_b1024"] * 1000 for r in rs], 3),
            common.fmt_pm([r["speedup_b1024"] for r in rs], 2),
            common.fmt_pm([r["latency_ms_per_sample_b1"] * 1000 for r in rs], 1),
            common.fmt_pm([r["w2"] for r in rs], 4),
            common.fmt_pm([100 * r["delta_w2"] / next(x for x in run["rows"] if x["model"] == "distilled")["w2"]
                           for r, run in zip(rs, runs)], 1),
        ])
    lines += [common.md_table(["model", "bytes", "size / fp32", f"µs/sample @{cfg['batch']}", "speed-up",
                               "µs/sample @1", "W2", "ΔW2 %"], table), ""]
    prof = runs[0].get("int4_kernel_profile_b1024") or []
    if prof:
        lines += [f"Where the int4 kernel's time goes (one forward at batch {cfg['batch']}, seed {runs[0]['seed']}, "
                  "`torch.profiler`, self CPU time):", "",
                  common.md_table(["op", "calls", "self ms", "share"],
                                  [[f"`{e['op']}`", e["calls"], f"{e['self_ms']:.2f}", f"{100 * e['share']:.0f}%"]
                                   for e in prof]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantization", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--wait-for-quiet", type=float, default=0.0, metavar="SECONDS")
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--require-quiet", action="store_true",
                    help="measure nothing (exit 3) if the load is still at or above --max-load after waiting")
    ap.add_argument("--set", dest="extra", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else QuantConfig()
    if args.extra:
        cfg = replace(cfg, extra=tuple(cfg.extra) + tuple(args.extra))
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    common.set_threads()
    if args.wait_for_quiet > 0 or args.require_quiet:
        load = common.wait_for_quiet(args.max_load, args.wait_for_quiet)
        if args.require_quiet and load and load[0] >= args.max_load:
            print(f"[quantization] load {load[0]:.2f} ≥ {args.max_load}: not measuring", file=sys.stderr)
            raise SystemExit(3)
    env = common.environment()
    runs = [run(cfg, seed) for seed in cfg.seeds]
    command = ("python -m benchmarks.quantization " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    data = {"benchmark": NAME, "command": command, "config": asdict(cfg), "environment": env,
            "environment_after": {"loadavg": common.loadavg()}, "result": {"runs": runs}}
    md = markdown(data)
    common.publish(NAME, data, md, args.quick)
    return data


if __name__ == "__main__":
    main()
