"""Reflow ablation on digits: uniform vs U-shaped p(t), L2 vs pseudo-Huber; FD at 1 and 2 NFE.

(One script of ~430 lines on purpose: a benchmark run by hand, its cells and report together.)

One digits workspace (``data.target=digits``; the images profile, rectflow/profiles/images.yaml, applies) is
made, or reused with ``--workspace``, by the pipeline's own stages (:func:`tasks.runner.run_stage`:
prepare, pretrain, couple). Every cell shares it: the same frozen FD feature net, the same ``rf1``
and the same round-1 pairs. A cell is (``reflow.time_dist`` ∈ {uniform, u_shaped}) ×
(``reflow.loss`` ∈ {l2, pseudo_huber}) × seed: the 2-rectified flow trained from ``rf1``'s weights
on round 1 as :func:`tasks.reflow.train_on_pairs` trains it (:func:`train_rf2`), with the effective digits reflow settings and
only ``time_dist``/``loss`` replaced. The seed is ``p.seed`` of that training (as ``--set seed=S``
would give the reflow stage): it draws the batch order and the times t; the initial weights are
always ``rf1``'s (with the default params and seed 0, uniform / l2 / seed 0 is the pipeline's own
``rf2``). Each cell trains in its own directory, which links ``data/prepared``,
``models/rf1.*`` and ``data/couplings/round-1`` of the shared workspace, so the workspace's own
``models/rf2`` is never touched and no two cells share a checkpoint.

Every model is evaluated as the evaluate stage does: Euler samples from the evaluation noise
(:func:`tasks.evaluate.eval_noise`, ``evaluate.n_samples`` of the effective params), the Fréchet
distance in the prepare stage's frozen feature net against the training split
(:func:`tasks.features.fd_scorer`; its sha256 is recorded), W2 against the held-out split.
References: ``rf1`` at NFE 1, 2 and 100, and the floor: the held-out split itself scored the same way.

Run: ``python -m benchmarks.ablation_digits [--quick] [--workspace DIR] [--work-dir DIR]
[--steps N] [--seeds S ...]``. ``--work-dir`` keeps the workspace and the cells, so that a rerun
reuses the finished ones.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "ablation_digits"
TIME_DISTS = ("uniform", "u_shaped")
LOSSES = ("l2", "pseudo_huber")
NFES = (1, 2)
REF_NFES = (1, 2, 100)


@dataclass
class AblationConfig:
    time_dists: tuple[str, ...] = TIME_DISTS
    losses: tuple[str, ...] = LOSSES
    seeds: tuple[int, ...] = (0, 1)
    nfes: tuple[int, ...] = NFES
    ref_nfes: tuple[int, ...] = REF_NFES
    reflow_steps: int | None = None  # None: the resolved digits params (the images profile's reflow)
    extra: tuple[str, ...] = ()  # --set overrides for every stage (after data.target=digits)


# Smoke-sized: a few seconds per stage on one thread.
QUICK_SETS = (
    "pretrain.steps=30", "couple.n_pairs=500", "couple.shard_size=500", "couple.batch_size=500",
    "couple.solver=euler", "couple.steps=10", "reflow.steps=20", "evaluate.n_samples=200",
)


def _quick_sets() -> tuple[str, ...]:
    """QUICK_SETS, plus few source draws for the BOSS schedule pretrain saves beside rf1 (where the
    params have a ``bellman`` section): the ablation does not use it."""
    from rectflow.config import Params

    bellman = Params.model_fields.get("bellman")
    fields = getattr(bellman.annotation, "model_fields", {}) if bellman is not None else {}
    return QUICK_SETS + (("bellman.n_samples=32",) if "n_samples" in fields else ())


def overrides(cfg: AblationConfig, quick: bool) -> list[str]:
    return ["data.target=digits", *(_quick_sets() if quick else ()), *cfg.extra]


# ---- the shared workspace ------------------------------------------------------------------------


def _prepared_ok(lay) -> bool:
    from rectflow.io import read_json

    meta_path = lay.prepared / "meta.json"
    if not meta_path.is_file() or not (lay.prepared / "features.safetensors").is_file():
        return False
    meta = read_json(meta_path)
    kind = meta.get("target", {}).get("kind")
    if kind != "digits":
        raise SystemExit(f"ablation_digits: {lay.root} holds data prepared for {kind!r}, not digits; "
                         "give a digits workspace or none")
    return True


def _round1_ok(lay) -> bool:
    from rectflow.nets import read_model_card
    from rectflow.pairs import ManifestError, read_manifest

    try:
        man = read_manifest(lay.round_dir(1))
    except ManifestError:
        return False
    if any(not (lay.round_dir(1) / e["name"]).is_file() for e in man["shards"]):
        return False
    rf1_sha = read_model_card(lay.model("rf1"))["meta"].get("sha256")
    return man.get("model", {}).get("sha256") == rf1_sha  # pairs of this very rf1


def ensure_workspace(ws: Path, params_path: Path, ov: list[str]) -> dict[str, Any]:
    """Run prepare, pretrain, couple in ``ws`` where their outputs are missing; return what was done."""
    from tasks.runner import run_stage
    from rectflow.layout import Layout

    lay = Layout(ws)
    need = {"prepare": not _prepared_ok(lay)}
    need["pretrain"] = need["prepare"] or not lay.model("rf1").with_suffix(".safetensors").is_file()
    need["couple"] = need["pretrain"] or not _round1_ok(lay)
    out: dict[str, Any] = {}
    for stage in ("prepare", "pretrain", "couple"):
        if not need[stage]:
            out[stage] = {"reused": True}
            continue
        t0 = time.perf_counter()
        rec = run_stage(stage, params_path, ov, ws)
        out[stage] = {"reused": False, "wall_seconds": round(time.perf_counter() - t0, 3)} | {
            k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
        print(f"[ablation] {stage}: {out[stage]['wall_seconds']:.1f} s", file=sys.stderr, flush=True)
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def cell_layout(base: Path, cell_dir: Path):
    """A workspace for one cell: the shared inputs linked in, its own models/ and checkpoints."""
    from rectflow.layout import Layout

    b, c = Layout(base), Layout(cell_dir)
    _link(b.prepared, c.prepared)
    _link(b.round_dir(1), c.round_dir(1))
    for suffix in (".safetensors", ".json"):
        _link(b.model("rf1").with_suffix(suffix), c.model("rf1").with_suffix(suffix))
    return c


# ---- evaluation ----------------------------------------------------------------------------------


def evaluate_flow(model, z0, scorer, ref_test, nfes) -> list[dict[str, Any]]:
    """FD (and precision / recall) and W2 of Euler samples from ``z0`` at each NFE."""
    import torch

    from rectflow.metrics import w2
    from rectflow.solvers import solve

    rows = []
    with torch.inference_mode():
        for k in nfes:
            t0 = time.perf_counter()
            sol = solve(model, z0, "euler", k)
            x = sol.x.float().cpu()
            sample_s = time.perf_counter() - t0
            sc = scorer(x)
            rows.append({"nfe": int(sol.nfe), "fd": sc["fd"], "precision": sc["precision"], "recall": sc["recall"],
                         "w2": w2(x, ref_test), "sample_seconds": round(sample_s, 3)})
    return rows


# ---- the ablation --------------------------------------------------------------------------------


def run(cfg: AblationConfig, quick: bool, workspace: Path | None, work_dir: Path | None, keep: bool) -> dict[str, Any]:
    from rectflow.params import load_params
    from rectflow.data import load_prepared
    from rectflow.layout import Layout
    from rectflow.lock import workspace_lock
    from rectflow.metrics import w2
    from rectflow.nets import read_model_card
    from rectflow.models import load_model
    from rectflow.pairs import read_manifest
    from tasks._common import device
    from tasks.evaluate import eval_noise
    from tasks.features import fd_scorer

    temp = None
    if work_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="rectflow-ablation-"))
        work_dir = temp
    work_dir = work_dir.resolve()
    ws = (workspace or work_dir / "base").resolve()
    ws.mkdir(parents=True, exist_ok=True)
    params_path = ws / "params.yaml"
    if not params_path.is_file():
        shutil.copy(common.PARAMS, params_path)
    ov = overrides(cfg, quick)
    t_all = time.perf_counter()
    try:
        with workspace_lock(ws):  # no pipeline run rewrites rf1 or round 1 under the cells
            stages = ensure_workspace(ws, params_path, ov)
            p = load_params(params_path, ov)
            lay = Layout(ws)
            dev = device()
            rf1_card = read_model_card(lay.model("rf1"))
            man = read_manifest(lay.round_dir(1))
            test = load_prepared(lay.prepared, "target", "test")
            train_split = load_prepared(lay.prepared, "target", "train")
            shape = tuple(test.shape)
            n = p.evaluate.n_samples
            z0 = eval_noise(p, lay, n, shape).to(dev)
            scorer = fd_scorer(p, lay, dev)
            if scorer is None:
                raise SystemExit(f"ablation_digits: {lay.prepared} has no FD feature net; rerun prepare")
            floor = scorer(test.data)
            fd_sha = floor["fd_net_sha256"]
            rf1, _ = load_model(lay.model("rf1"), dev)
            reference: dict[str, Any] = {"rf1": evaluate_flow(rf1, z0, scorer, test.data, cfg.ref_nfes)}
            reference["floor"] = {"fd": floor["fd"], "precision": floor["precision"], "recall": floor["recall"],
                                  "n": len(test.data), "w2": w2(train_split.data[:n], test.data)}
            del rf1

            cells = []
            for td in cfg.time_dists:
                for loss in cfg.losses:
                    for seed in cfg.seeds:
                        cells.append(run_cell(ws, work_dir, p, td, loss, seed, cfg, z0, scorer, test.data, rf1_card, man))
    finally:
        if temp is not None and not keep:
            shutil.rmtree(temp, ignore_errors=True)
    reflow_used = cells[0]["reflow"] if cells else {}
    return {
        "workspace": str(ws) if workspace else None,
        "work_dir": str(work_dir) if (keep or temp is None) else None,
        "stages": stages,
        "fd_net_sha256": fd_sha,
        "rf1_sha256": rf1_card["meta"].get("sha256"),
        "round1": {"fingerprint": man.get("fingerprint"), "n_pairs": man.get("n_pairs"), "solver": man.get("solver")},
        "model": rf1_card["arch"],
        "n_samples": n,
        "pretrain": p.pretrain.model_dump(mode="json"),
        "reflow": reflow_used,
        "reference": reference,
        "cells": cells,
        "wall_seconds": round(time.perf_counter() - t_all, 1),
    }


def train_rf2(p, lay) -> dict[str, Any]:
    """rf2 from round 1's pairs, initialised from rf1: the pipeline's own :func:`tasks.reflow.train_on_pairs`
    (same seeds, inputs, checkpoint fingerprint and model card), without the BOSS schedule the pipeline
    also saves beside the flow (not part of this ablation, nor of its training time)."""
    from tasks.reflow import train_on_pairs

    return train_on_pairs(p, lay, 1, schedule=False)


def run_cell(ws: Path, work_dir: Path, p, td: str, loss: str, seed: int, cfg: AblationConfig, z0, scorer,
             ref_test, rf1_card: dict[str, Any], man: dict[str, Any]) -> dict[str, Any]:
    """Train (or reuse, in a kept ``--work-dir``) one cell's rf2 and evaluate it."""
    from rectflow.config import ReflowParams
    from rectflow.io import atomic_write_json, read_json
    from rectflow.nets import read_model_card
    from rectflow.models import load_model
    from rectflow.train import fingerprint

    changes: dict[str, Any] = {"time_dist": td, "loss": loss}
    if cfg.reflow_steps is not None:
        changes["steps"] = cfg.reflow_steps
    reflow = ReflowParams.model_validate(p.reflow.model_dump() | changes)
    pc = p.model_copy(update={"seed": seed, "reflow": reflow})
    key = fingerprint(reflow.model_dump(mode="json"), seed, rf1_card["meta"].get("sha256"), man.get("fingerprint"))
    cell_dir = work_dir / "cells" / f"{td}-{loss}-s{seed}"
    lay = cell_layout(ws, cell_dir)
    done_path = cell_dir / "train.json"
    train_rec = None
    if done_path.is_file() and lay.model("rf2").with_suffix(".safetensors").is_file():
        prev = read_json(done_path)
        rf2_sha = read_model_card(lay.model("rf2"))["meta"].get("sha256")
        if prev.get("key") == key and prev.get("record", {}).get("sha256") == rf2_sha:
            train_rec = prev["record"] | {"reused": True}
    if train_rec is None:
        print(f"[ablation] cell {td} / {loss} / seed {seed}: training rf2 ({reflow.steps} steps)",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rec = train_rf2(pc, lay)
        train_rec = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))} | {
            "wall_seconds": round(time.perf_counter() - t0, 3)}
        atomic_write_json(done_path, {"key": key, "record": train_rec})
    model, _ = load_model(lay.model("rf2"), z0.device)
    rows = evaluate_flow(model, z0, scorer, ref_test, cfg.nfes)
    print(f"[ablation] cell {td} / {loss} / seed {seed}: "
          + ", ".join(f"FD@{r['nfe']} {r['fd']:.3f}" for r in rows)
          + f" ({train_rec.get('train_seconds')} s training)", file=sys.stderr, flush=True)
    return {"time_dist": td, "loss": loss, "seed": seed, "reflow": reflow.model_dump(mode="json"),
            "train": train_rec, "rows": rows}


# ---- summary and report --------------------------------------------------------------------------


def aggregate(result: dict[str, Any]) -> dict[str, Any]:
    """Per ``time_dist/loss``: the values over seeds of FD, W2 (per NFE) and training seconds."""
    out: dict[str, Any] = {}
    for c in result["cells"]:
        a = out.setdefault(f"{c['time_dist']}/{c['loss']}", {"seeds": [], "fd": {}, "w2": {}, "train_seconds": [],
                                                              "final_loss": []})
        a["seeds"].append(c["seed"])
        a["train_seconds"].append(c["train"].get("train_seconds"))
        a["final_loss"].append(c["train"].get("final_loss"))
        for r in c["rows"]:
            a["fd"].setdefault(str(r["nfe"]), []).append(r["fd"])
            a["w2"].setdefault(str(r["nfe"]), []).append(r["w2"])
    for a in out.values():
        for metric in ("fd", "w2"):
            a[f"{metric}_mean_std"] = {k: list(common.mean_std(v)) for k, v in a[metric].items()}
        a["train_seconds_mean_std"] = list(common.mean_std(a["train_seconds"]))
    return out


def _arch_line(arch: dict[str, Any]) -> str:
    if arch.get("kind") == "unet":
        return (f"U-Net, {arch.get('channels')} channels × {arch.get('channel_mult')}"
                + (", attention" if arch.get("attention") else ""))
    return f"{arch.get('kind')} {arch.get('depth', '')}×{arch.get('hidden', '')}"


def markdown(data: dict[str, Any]) -> str:
    res, env, cfg = data["result"], data["environment"], data["config"]
    summ = data["summary"]
    rf = res["reflow"]
    nfes = [str(k) for k in cfg["nfes"]]
    arch = res["model"]
    huber_c = rf.get("huber_c")
    dim = 1
    for s in arch.get("shape", []):
        dim *= int(s)
    lines = [
        "## Reflow ablation on digits: time distribution × loss",
        "",
        f"Reproduce: `{data['command']}`",
        "",
        common.env_lines(env) + f" Load after: {common.load_line(data['environment_after']['loadavg'])}; "
        f"whole run {res['wall_seconds'] / 60:.1f} min.",
        "",
        f"One digits workspace ({'×'.join(map(str, arch.get('shape', [])))}, {_arch_line(arch)}): prepare, "
        f"pretrain ({res['pretrain']['steps']} steps, batch {res['pretrain']['batch_size']}), couple "
        f"({res['round1']['n_pairs']} pairs by {(res['round1']['solver'] or {}).get('name')} "
        f"{(res['round1']['solver'] or {}).get('steps') or ''} steps), shared by every cell. Each cell "
        f"trains the 2-rectified flow from rf1 on the round-1 pairs: {rf.get('steps')} steps, batch "
        f"{rf.get('batch_size')}, lr {rf.get('lr')}, {rf.get('precision')}, EMA {rf.get('ema')}; only "
        "`reflow.time_dist` (uniform: U(10⁻³, 1); u_shaped: p(t) ∝ cosh(4(t − ½))) and `reflow.loss` "
        f"(l2: mean squared error; pseudo_huber: √(‖·‖² + c²) − c, c = "
        f"{huber_c if huber_c is not None else f'0.00054·√{dim} = {0.00054 * dim ** 0.5:.5f}'}) change; the "
        f"seed (of the reflow training only: batch order, t) over {list(cfg['seeds'])}. FD: Fréchet distance "
        f"in the prepare stage's frozen feature net (sha256 `{str(res['fd_net_sha256'])[:12]}…`) between "
        f"{res['n_samples']} Euler samples from the evaluation noise and the training split, as "
        "`metrics/eval.json` reports it; W2 against the held-out split. Cells: mean ± std over seeds.",
        "",
    ]
    rows = []
    for key, a in summ.items():
        td, loss = key.split("/")
        rows.append([td, loss, *(common.fmt_pm(a["fd"].get(k, [])) for k in nfes),
                     *(common.fmt_pm(a["w2"].get(k, [])) for k in nfes), common.fmt_pm(a["train_seconds"], 1)])
    lines += [common.md_table(["time_dist", "loss", *(f"FD, NFE {k}" for k in nfes), *(f"W2, NFE {k}" for k in nfes),
                               "training s"], rows), ""]
    ref = res["reference"]
    ref_rows = [["1-RF (rf1)", str(r["nfe"]), f"{r['fd']:.3f}", f"{r['w2']:.3f}"] for r in ref["rf1"]]
    fl = ref["floor"]
    ref_rows.append([f"floor: held-out split ({fl['n']} images)", "–", f"{fl['fd']:.3f}", f"{fl['w2']:.3f}"])
    lines += ["Reference, same noise and scorer:", "",
              common.md_table(["model", "NFE (Euler)", "FD", "W2"], ref_rows), "",
              f"The floor's FD is the held-out split ({fl['n']} images) against the training split; FD is "
              f"biased upwards for small samples, so it is an upper bound of what {res['n_samples']} perfect "
              f"samples would score. Its W2: {res['n_samples']} training images against the held-out split. "
              "Training seconds: the training loop of each cell, run one cell after another."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ablation_digits", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-sized run (seconds per stage), results in NAME.quick.json")
    ap.add_argument("--workspace", type=Path, default=None, metavar="DIR",
                    help="a digits workspace to reuse (prepare, pretrain, couple run there only where missing; "
                    "its params.yaml is read: repeat with --set any override it was made with)")
    ap.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                    help="keep the cells (and, without --workspace, the workspace) here; a rerun reuses them")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--steps", type=int, default=None, help="reflow steps of every cell (default: the images profile's)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="reflow seeds (default: 0 1)")
    ap.add_argument("--time-dists", nargs="+", choices=("uniform", "logit_normal", "u_shaped"), default=None)
    ap.add_argument("--losses", nargs="+", choices=LOSSES, default=None)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra KEY=VALUE for every stage")
    ap.add_argument("--wait-for-quiet", type=float, default=0.0, metavar="SECONDS")
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--require-quiet", action="store_true",
                    help="measure nothing (exit 3) if the load is still at or above --max-load after waiting")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error("--steps: must be ≥ 1")
    changes: dict[str, Any] = {"extra": tuple(args.extra), "reflow_steps": args.steps}
    for key in ("seeds", "time_dists", "losses"):
        if getattr(args, key):
            changes[key] = tuple(dict.fromkeys(getattr(args, key)))  # in order, without repeats
    cfg = replace(AblationConfig(), **changes)
    common.set_threads()
    if args.wait_for_quiet > 0 or args.require_quiet:
        load = common.wait_for_quiet(args.max_load, args.wait_for_quiet)
        if args.require_quiet and load and load[0] >= args.max_load:
            print(f"[ablation] load {load[0]:.2f} ≥ {args.max_load}: not measuring", file=sys.stderr)
            raise SystemExit(3)
    env = common.environment()
    result = run(cfg, args.quick, args.workspace, args.work_dir, args.keep)
    command = ("python -m benchmarks.ablation_digits " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    data = {"benchmark": NAME, "command": command, "quick": args.quick, "config": asdict(cfg),
            "overrides": overrides(cfg, args.quick), "environment": env,
            "environment_after": {"loadavg": common.loadavg()}, "result": result}
    data["summary"] = aggregate(result)
    md = markdown(data)
    common.publish(NAME, data, md, args.quick)
    return data


if __name__ == "__main__":
    main()
