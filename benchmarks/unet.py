"""The digits U-Net against the hardware: forward, training step, MFU, and rectflow's loop against a bare one.

What it measures, on whatever device :func:`rectflow.device.pick_device` picks (this CPU, or a GPU):

1. **Peaks**: dense matmul (4096², or 2048² on a CPU) and a 3×3 convolution (64 → 64 channels,
   16×16, batch 512) in fp32 and bf16: the FLOP/s the hardware reaches on the U-Net's own kind of
   work, the denominators of MFU.
2. **FLOPs per sample** of the images profile's U-Net (``arch`` defaults: 32 channels × [1, 2],
   attention, 1×8×8), counted by :class:`torch.utils.flop_counter.FlopCounterMode`: forward, and
   forward + backward (the optimizer step's few FLOPs per parameter are left out).
3. **Variants**: forward (inference_mode) at the couple batch and one training step (forward, MSE,
   backward, AdamW) at each training batch, for fp32 / bf16 autocast × NCHW / channels_last × eager /
   ``torch.compile`` (compile time stated: it pays only when a stage runs long enough); every
   variant is built first, then timed in ``--rounds`` interleaved rounds (median).
   MFU = FLOPs per sample × samples/s ÷ the conv peak of the same precision.
4. **rectflow against a bare loop**: :func:`rectflow.train.train` exactly as pretrain runs it
   (Gaussian × digits pairs drawn each step, p(t), warm-up, clipping, EMA, loss bookkeeping) against
   forward + MSE + backward + AdamW on one fixed batch, same network, batch and precision, in
   interleaved rounds (the ratio of each round's neighbouring runs; median over rounds).

Run: ``python -m benchmarks.unet [--quick] [--batches 128 512 ...] [--no-compile] [--tag gpu]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "unet"
SHAPE = (1, 8, 8)


def _timeit(fn, dev, min_s: float, warmup: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Seconds per call: ``warmup`` calls, then calls until ``min_s`` has passed (synchronised)."""
    for _ in range(warmup):
        fn()
    common.sync(dev)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n % 3 == 0:
            common.sync(dev)
            el = time.perf_counter() - t0
            if el >= min_s:
                return el / n


def peaks(dev, min_s: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """FLOP/s of a dense matmul and of a 3×3 convolution, fp32 and bf16."""
    import torch

    out: dict[str, float] = {}
    n = 4096 if dev.type == "cuda" else 2048
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
        s = _timeit(lambda: a @ b, dev, min_s)
        out[f"matmul_{name}"] = 2 * n**3 / s
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(dev, dt)
        x = torch.randn(512, 64, 16, 16, device=dev, dtype=dt)
        with torch.inference_mode():
            s = _timeit(lambda: conv(x), dev, min_s)
        out[f"conv_{name}"] = 2 * 512 * 64 * 64 * 9 * 16 * 16 / s
    return out


def build(dev, channels_last: bool):  # type: ignore[no-untyped-def]
    import torch

    from rectflow.unet import UNetVelocity

    torch.manual_seed(0)
    m = UNetVelocity(SHAPE).to(dev)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def flops_per_sample(dev) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    m, b = build(dev, False), 64
    x, t = torch.randn(b, *SHAPE, device=dev), torch.rand(b, device=dev)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x, t)
    fwd = fc.get_total_flops() / b
    with FlopCounterMode(display=False) as fc:
        m(x, t).square().mean().backward()
    return {"forward": fwd, "train": fc.get_total_flops() / b,
            "params": float(sum(p.numel() for p in m.parameters()))}


def variant(dev, precision: str, channels_last: bool, compiled: bool, batches: list[int],
            fwd_batch: int) -> tuple[dict[str, Any], dict[str, Any]]:  # type: ignore[no-untyped-def]
    """A variant's record (with its first-call times: compilation) and its closures: ``fwd`` (one
    forward at ``fwd_batch``) and ``train[b]`` (one training step at batch ``b``)."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    m = build(dev, channels_last)
    net = torch.compile(m) if compiled else m
    rec: dict[str, Any] = {"precision": precision, "channels_last": channels_last, "compiled": compiled}
    x = torch.randn(fwd_batch, *SHAPE, device=dev).contiguous(memory_format=fmt)
    t = torch.rand(fwd_batch, device=dev)

    def fwd() -> None:
        with torch.inference_mode(), autocast:
            net(x, t)

    def first(fn) -> float:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        fn()
        common.sync(dev)
        return time.perf_counter() - t0

    rec["forward_first_call_s"] = first(fwd)
    steps: dict[int, Any] = {}
    rec["train_first_call_s"] = {}
    m.train()
    for b in batches:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True)
        xb = torch.randn(b, *SHAPE, device=dev).contiguous(memory_format=fmt)
        tb, target = torch.rand(b, device=dev), torch.randn(b, *SHAPE, device=dev)

        def step(net=net, opt=opt, xb=xb, tb=tb, target=target) -> None:  # type: ignore[no-untyped-def]
            with autocast:
                pred = net(xb, tb)
            loss = (pred.float() - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rec["train_first_call_s"][str(b)] = first(step)
        steps[b] = step
    return rec, {"fwd": fwd, "train": steps}


def measure_variants(dev, specs: list[tuple[str, bool, bool]], batches: list[int], fwd_batch: int,
                     min_s: float, rounds: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Every variant built (and compiled) first, then ``rounds`` interleaved rounds of each one's
    forward and training timings (this VM's speed drifts by ±15% within minutes: the median over
    rounds, each of which sees every variant at nearly the same moment)."""
    built = [variant(dev, prec, cl, comp, batches, fwd_batch) for prec, cl, comp in specs]
    fwd: list[list[float]] = [[] for _ in built]
    train: list[dict[int, list[float]]] = [{b: [] for b in batches} for _ in built]
    for _ in range(rounds):
        for i, (_, fns) in enumerate(built):
            fwd[i].append(fwd_batch / _timeit(fns["fwd"], dev, min_s))
            for b in batches:
                train[i][b].append(b / _timeit(fns["train"][b], dev, min_s))
    out = []
    for i, (rec, _) in enumerate(built):
        rec["forward_samples_per_s"] = statistics.median(fwd[i])
        rec["forward_all"] = fwd[i]
        rec["train"] = {str(b): {"samples_per_s": statistics.median(train[i][b]), "all": train[i][b],
                                 "first_call_s": rec["train_first_call_s"][str(b)]} for b in batches}
        out.append(rec)
        print(f"[unet] {rec['precision']} {'cl' if rec['channels_last'] else 'nchw'} "
              f"{'compiled' if rec['compiled'] else 'eager'}: fwd {rec['forward_samples_per_s']:,.0f}/s, train "
              f"{[round(x['samples_per_s']) for x in rec['train'].values()]}", file=sys.stderr, flush=True)
    return out


def bare_loop(dev, batch: int, steps: int, precision: str) -> float:  # type: ignore[no-untyped-def]
    """Samples/s of forward + MSE + backward + AdamW on one fixed batch (no data, EMA, clipping)."""
    import torch

    x0, x1 = torch.randn(batch, *SHAPE, device=dev), torch.rand(batch, *SHAPE, device=dev)
    return common.bare_train_rate(build(dev, False), x0, x1, steps, max(5, steps // 5), precision, lr=5e-4)


def rectflow_loop(dev, batch: int, steps: int, precision: str, work: Path) -> float:  # type: ignore[no-untyped-def]
    """Samples/s of :func:`rectflow.train.train` as the pretrain stage runs it on digits."""
    import torch

    from rectflow.data import Distribution, load_digits

    target = Distribution(SHAPE, torch.from_numpy(load_digits()[0]))
    return common.rectflow_train_rate(
        lambda: build(dev, False), Distribution(SHAPE), target,
        ["data.target=digits", f"pretrain.batch_size={batch}", f"pretrain.precision={precision}"],
        steps, max(5, steps // 5), dev, work)


def loop_comparison(dev, batches: list[int], precisions: list[str], steps: int, repeats: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    work = Path(tempfile.mkdtemp(prefix="rectflow-unet-bench-"))
    out = []
    try:
        for precision in precisions:
            for b in batches:
                load_before = common.loadavg()
                bare, ours = common.interleaved(lambda: bare_loop(dev, b, steps, precision),
                                                lambda: rectflow_loop(dev, b, steps, precision, work), repeats)
                ratios = [o / r for o, r in zip(ours, bare)]
                out.append({
                    "batch": b, "precision": precision, "steps": steps,
                    "bare_samples_per_s": statistics.median(bare), "train_samples_per_s": statistics.median(ours),
                    "fraction_of_bare": statistics.median(ratios), "bare_all": bare, "train_all": ours,
                    "load_before": load_before, "load_after": common.loadavg(),
                })
                print(f"[unet] loop b{b} {precision}: rectflow {out[-1]['train_samples_per_s']:,.0f} vs bare "
                      f"{out[-1]['bare_samples_per_s']:,.0f} samples/s ({100 * out[-1]['fraction_of_bare']:.1f}%)",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def markdown(data: dict[str, Any]) -> str:
    env, pk, fl = data["environment"], data["peaks"], data["flops"]
    tag = data.get("tag")
    lines = [
        f"## The digits U-Net against the hardware{f' ({tag})' if tag else ''}", "",
        f"Reproduce: `{data['command']}`", "",
        common.env_lines(env) + f" Load after: {common.load_line(data['environment_after']['loadavg'])}.", "",
        f"U-Net of the images profile ({fl['params']:,.0f} parameters, 1×8×8): **{fl['forward'] / 1e6:.2f} MFLOP** per "
        f"sample forward, **{fl['train'] / 1e6:.2f} MFLOP** forward + backward (FlopCounterMode). Peaks measured here: "
        f"matmul fp32 {pk['matmul_fp32'] / 1e9:,.0f} / bf16 {pk['matmul_bf16'] / 1e9:,.0f} GFLOP/s, 3×3 conv (64 ch, 16×16, "
        f"batch 512) fp32 {pk['conv_fp32'] / 1e9:,.0f} / bf16 {pk['conv_bf16'] / 1e9:,.0f} GFLOP/s. "
        "MFU: achieved FLOP/s ÷ the conv peak of the same precision.", "",
    ]
    batches = data["config"]["batches"]
    head = ["precision", "layout", "graph", f"forward @ {data['config']['fwd_batch']} (samples/s, MFU)",
            *[f"train @ {b} (samples/s, MFU)" for b in batches], "first call (fwd / train s)"]
    rows = []
    for v in data["variants"]:
        peak = pk[f"conv_{v['precision']}"]
        f = v["forward_samples_per_s"]
        cells = [v["precision"], "channels_last" if v["channels_last"] else "NCHW",
                 "compiled" if v["compiled"] else "eager", f"{f:,.0f} ({100 * f * fl['forward'] / peak:.0f}%)"]
        for b in batches:
            r = v["train"][str(b)]["samples_per_s"]
            cells.append(f"{r:,.0f} ({100 * r * fl['train'] / peak:.0f}%)")
        first = max(v["train"][str(b)]["first_call_s"] for b in batches)
        cells.append(f"{v['forward_first_call_s']:.1f} / {first:.1f}")
        rows.append(cells)
    lines += [common.md_table(head, rows), ""]
    if data["loops"]:
        lines += ["**rectflow's training loop against a bare one** (digits pairs as pretrain draws them, "
                  f"{data['loops'][0]['steps']} steps a run, {data['config']['repeats']} interleaved rounds; "
                  "rectflow / bare: median of the rounds' paired ratios):", ""]
        lines += [common.md_table(
            ["batch", "precision", "bare samples/s", "rectflow samples/s", "rectflow / bare (≥ 90%)"],
            [[r["batch"], r["precision"], f"{r['bare_samples_per_s']:,.0f}", f"{r['train_samples_per_s']:,.0f}",
              f"**{100 * r['fraction_of_bare']:.1f}%**"] for r in data["loops"]]), ""]
    return "\n".join(lines).rstrip("\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.unet", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="training batches (default 128; GPU 128 … 4096)")
    ap.add_argument("--fwd-batch", type=int, default=2500, help="forward batch (couple's)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the loop comparison")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the variants' timings")
    ap.add_argument("--loop-steps", type=int, default=150)
    ap.add_argument("--tag", default=None, help="a variant's name (e.g. gpu): results unet-TAG.json, its own section")
    ap.add_argument("--wait-for-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to SECONDS for the 1-minute load to drop below --max-load first")
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--require-quiet", action="store_true",
                    help="measure nothing (exit 3) if the load is still at or above --max-load after waiting")
    args = ap.parse_args(argv)
    common.set_threads()
    if args.wait_for_quiet > 0 or args.require_quiet:
        load = common.wait_for_quiet(args.max_load, args.wait_for_quiet)
        if args.require_quiet and load and load[0] >= args.max_load:
            print(f"[unet] load {load[0]:.2f} ≥ {args.max_load}: not measuring", file=sys.stderr)
            raise SystemExit(3)
    from rectflow.device import pick_device

    dev = pick_device()
    batches = args.batches or ([128, 512, 1024, 2048, 4096] if dev.type == "cuda" else [128])
    min_s = 0.3 if args.quick else 1.0
    env = common.environment()
    pk = peaks(dev, min_s)
    fl = flops_per_sample(dev)
    specs = [(prec, cl, False) for prec in ("fp32", "bf16") for cl in (False, True)]
    if not (args.no_compile or args.quick):
        specs += [(prec, False, True) for prec in ("fp32", "bf16")]
    variants = measure_variants(dev, specs, batches, args.fwd_batch, min_s, 1 if args.quick else args.rounds)
    loops = loop_comparison(dev, [batches[0]], ["fp32", "bf16"], 20 if args.quick else args.loop_steps,
                            1 if args.quick else args.repeats)
    command = ("python -m benchmarks.unet " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    data = {"benchmark": NAME, "command": command, "tag": args.tag, "environment": env,
            "environment_after": {"loadavg": common.loadavg()},
            "config": {"batches": batches, "fwd_batch": args.fwd_batch, "repeats": args.repeats, "rounds": args.rounds},
            "peaks": pk, "flops": fl, "variants": variants, "loops": loops}
    name = NAME + (f"-{args.tag}" if args.tag else "")
    common.publish(name, data, markdown(data), args.quick)
    return data


if __name__ == "__main__":
    main()
