"""Smaller one-step students side by side on the same pairs: regression, SlimFlow, MeanFlow.

Per seed, in a temporary workspace and through the pipeline's own stages (prepare, pretrain,
couple, reflow with ``params.yaml``'s settings), then the distill stage once per student, each on
the same pairs (the last flow's round 2; for images the profile's ``distill.pairs_round`` 1, rf1's
round-1 pairs) from the same rf2 (the teacher):

- ``regression (teacher size)``: the default student (rf2's architecture, from its weights): the
  reference row.
- ``regression (small)``, ``slimflow (small)``, ``meanflow (small)``: ``--small`` (default: an MLP
  of width 112 and depth 3, 33,042 parameters against rf2's 148,994: 0.22×), from random weights,
  with the same total steps and learning rate (SlimFlow: ``reflow_steps`` of annealing reflow then
  the rest as distillation).
- ``meanflow (teacher size)``: MeanFlow with rf2's architecture (random weights).
- ``online (small)`` (only when named in ``--only``): the small student distilled online from the
  teacher-size row's student (``distill.teacher_model``: fresh source noise every batch, that
  student's one-step outputs as targets), which then runs (or is taken from ``--reuse``) first.

Each student: W2 after one Euler step (MeanFlow: z1 = z0 + u(z0, 0, 1)) on the evaluate stage's
noise against the held-out target (exact W2, :func:`rectflow.metrics.w2`), for images (digits) the
FD of the evaluate stage (its frozen feature net, against the training split) instead; parameters,
bytes, latency per sample at batch 1 and 1024, training seconds; the teachers' figure with 100
Euler steps (rf2, and rf1) beside them.

Images: ``--small`` defaults to ``{channels: 16, attention: false}`` (120,033 parameters against the
U-Net's 485,185: 0.247×); the teacher-size row keeps the images profile's adversarial term, the
small regression student too, SlimFlow and MeanFlow run without it. ``--reuse DIR ...`` (one
finished workspace per seed, in the order of ``--seeds``) takes each run's prepare, rf1, rf2,
coupling rounds and (as the teacher-size row, not retrained) its ``distilled`` (a digits run costs
~16 min on 2 cores).

Run: ``python -m benchmarks.students [--seeds 0 1 2] [--quick]``;
``python -m benchmarks.students --target digits --seeds 0 1 --reuse /path/to/seed0 /path/to/seed1``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "students"


TEACHER_STEM = "teachers/distilled"  # where the teacher-size row's student is kept for ``online (small)``
SMALL = {"moons": "{hidden: 112, depth: 3}", "digits": "{channels: 16, attention: false}"}


@dataclass
class StudentsConfig:
    target: str = "moons"
    small: str = SMALL["moons"]
    steps: int = 6000  # every student's total training steps
    lr: float = 1e-3
    slim_reflow_steps: int = 3000  # of steps, SlimFlow's annealing reflow
    n_eval: int = 5000
    n_eval_images: int | None = None  # None: the run's evaluate.n_samples
    repeats: int = 20
    extra: list[str] = field(default_factory=list)  # overrides for every stage (--quick shrinks it)
    reuse: str | None = None  # a finished workspace whose chain (and distilled) are taken (this seed's)
    only: list[str] = field(default_factory=list)  # the student rows to run (empty: all)
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE: every trained student's distill


def students(cfg: StudentsConfig) -> list[tuple[str, list[str] | None]]:
    """(row label, distill overrides; None: the reused workspace's own ``distilled``)."""
    rnd = [f"distill.steps={cfg.steps}", f"distill.lr={cfg.lr}", "distill.warmup=200"]
    small = f"distill.student={cfg.small}"
    plain = ["distill.adversarial.weight=0"]  # MeanFlow has no adversarial term
    rows: list[tuple[str, list[str] | None]] = [
        ("regression (teacher size)", None if cfg.reuse else []),
        ("regression (small)", [small, *rnd]),
        ("slimflow (small)", [small, *rnd[1:], *plain, "distill.method=slimflow",
                              f"distill.steps={cfg.steps - cfg.slim_reflow_steps}",
                              f"distill.slimflow.reflow_steps={cfg.slim_reflow_steps}"]),
        ("slimflow + adversarial (small)", [small, *rnd[1:], "distill.method=slimflow",
                                            f"distill.steps={cfg.steps - cfg.slim_reflow_steps}",
                                            f"distill.slimflow.reflow_steps={cfg.slim_reflow_steps}"]),
        ("online (small)", [small, *rnd, f"distill.teacher_model={TEACHER_STEM}"]),
        ("meanflow (small)", [small, *rnd, *plain, "distill.method=meanflow"]),
        ("meanflow (teacher size)", [*rnd, *plain, "distill.method=meanflow"]),
    ]
    if not cfg.only:  # the adversarial SlimFlow row only where the profile has the term (images), or asked
        rows = [r for r in rows if r[0] != "slimflow + adversarial (small)" or cfg.target == "digits"]
    if not cfg.only:  # online distillation of the teacher-size student: asked for by name (--only)
        rows = [r for r in rows if r[0] != "online (small)"]
    only = list(cfg.only)
    if "online (small)" in only and "regression (teacher size)" not in only:
        only.append("regression (teacher size)")  # its teacher, run (or taken) first: rows keep their order
    rows = [r for r in rows if not only or r[0] in only]
    return [(label, None if extra is None else [*extra, *cfg.overrides]) for label, extra in rows]


def _reuse(src: Path, root: Path) -> None:
    """Copy a finished run's inputs of distill (and its distilled) into the workspace ``root``."""
    for rel in ("data/prepared", "data/couplings"):
        shutil.copytree(src / rel, root / rel)
    (root / "models").mkdir(parents=True, exist_ok=True)
    for f in (src / "models").iterdir():
        if f.name.split(".")[0] in ("rf1", "rf2", "distilled"):
            shutil.copy2(f, root / "models" / f.name)


def latency(model: Any, z: Any, repeats: int) -> float:
    """Milliseconds per sample of one Euler step on ``z`` (median of ``repeats``)."""
    import statistics

    import torch

    from rectflow.solvers import solve

    with torch.inference_mode():
        for _ in range(3):
            solve(model, z, "euler", 1)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            solve(model, z, "euler", 1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000 / len(z)


def run(cfg: StudentsConfig, seed: int) -> dict[str, Any]:
    import torch

    from rectflow.data import load_prepared
    from rectflow.layout import Layout
    from rectflow.metrics import w2
    from rectflow.models import load_model
    from rectflow.nets import count_params
    from rectflow.params import load_params
    from benchmarks.fd_noise import FD_NOISE_SEED_OFFSET, model_features
    from rectflow.fd import extract_features, frechet_distance, load_feature_net
    from rectflow.io import file_sha256
    from tasks.evaluate import eval_noise
    from tasks.features import fd_scorer

    root = Path(tempfile.mkdtemp(prefix="rectflow-students-"))
    try:
        ov = [f"seed={seed}", f"data.target={cfg.target}", *cfg.extra]
        t_chain = {}
        if cfg.reuse:  # main checked its seed
            _reuse(Path(cfg.reuse), root)
        else:
            for stage in ("prepare", "pretrain", "couple", "reflow"):
                _, t_chain[stage] = common.timed(common.run_stage, stage, root, ov)
        lay = Layout(root)
        p = load_params(common.PARAMS, ov)
        if cfg.reuse:  # verifies the copied round's shards by sha256, remakes any missing (seeded: the same pairs)
            from tasks.couple import run_round

            _, t_chain["couple (repair)"] = common.timed(run_round, p, lay, p.distill_round())
        test = load_prepared(lay.prepared, "target", "test")
        images = len(test.shape) == 3
        # images: evaluate's sample size and draw, unless --n-eval says: then fd_noise's draw (10,000 paired
        # draws decide a 1.3× FD ratio, 1,000 cannot: BENCHMARKS "How much of a digits FD is the estimator"),
        # and the teachers' features come from its cache when it has scored the same weights on that draw
        n = (cfg.n_eval_images or p.evaluate.n_samples) if images else cfg.n_eval
        shape = tuple(test.shape)
        large = images and cfg.n_eval_images is not None
        z = eval_noise(p, lay, n, shape, **({"seed_offset": FD_NOISE_SEED_OFFSET} if large else {}))
        if images:  # FD against the training split, as the evaluate stage
            scorer = fd_scorer(p, lay, torch.device("cpu"))
            assert scorer is not None, "no feature net in data/prepared"

            def quality(x: torch.Tensor) -> float:
                return float(scorer(x, se=False)["fd"])
        else:
            ref = test.data[: min(n, len(test.data))]

            def quality(x: torch.Tensor) -> float:
                return w2(x, ref)
        z_lat = torch.randn(1024 if not images else p.evaluate.latency_batch, *shape,
                            generator=torch.Generator().manual_seed(1))
        teachers = {}
        if large:
            net = load_feature_net(lay.prepared / "features")
            ref_feats = extract_features(net, load_prepared(lay.prepared, "target", "train").data.numpy())
            net_sha = file_sha256(lay.prepared / "features.safetensors")
        with torch.inference_mode():
            for name in ("rf1", "rf2"):
                m, _ = load_model(lay.model(name), "cpu")
                q = (frechet_distance(model_features(lay.model(name), z, 100, net, net_sha, p=p)[0], ref_feats) if large
                     else quality(common.solve_chunked(m, z, 100)))
                teachers[name] = {"w2_100": q, "params": count_params(m)}
        rows = []
        for label, extra in students(cfg):
            if extra is None:  # the reused run's own student
                rec, secs = json.loads((Path(cfg.reuse) / "metrics" / "distill.json").read_text()), 0.0
            else:
                rec, secs = common.timed(common.run_stage, "distill", root, ov + extra)
            if label == "regression (teacher size)":  # the teacher of ``online (small)``, kept apart
                (root / TEACHER_STEM).parent.mkdir(parents=True, exist_ok=True)
                for suffix in (".json", ".safetensors"):
                    shutil.copy2(lay.model("distilled").with_suffix(suffix), (root / TEACHER_STEM).with_suffix(suffix))
            model, card = load_model(lay.model("distilled"), "cpu")
            x = common.solve_chunked(model, z, 1)
            s = rec["students"][0]
            q = quality(x)
            rows.append({
                "student": label, "method": card["meta"].get("method", "regression"), "init": card["meta"].get("init"),
                "arch": {k: v for k, v in card["arch"].items() if k != "shape"}, "params": count_params(model),
                "param_ratio": count_params(model) / teachers["rf2"]["params"],
                "bytes": lay.model("distilled").with_suffix(".safetensors").stat().st_size,
                "metric": "fd" if images else "w2", "reused": extra is None,
                "w2_1": q, "ratio_to_rf2_100": q / teachers["rf2"]["w2_100"],
                "ratio_to_rf1_100": q / teachers["rf1"]["w2_100"],
                "latency_ms_b1": latency(model, z_lat[:1], cfg.repeats * 10),
                "latency_ms_b1024": latency(model, z_lat, cfg.repeats),
                "train_seconds": s["train_seconds"], "steps": s["steps"], "final_loss": s["final_loss"],
                "stage_seconds": secs,
            })
            print(f"[students] seed {seed} {label}: {'FD' if images else 'W2'} {rows[-1]['w2_1']:.4f} "
                  f"({rows[-1]['ratio_to_rf2_100']:.3f}× rf2@100), {rows[-1]['params']} params, "
                  f"{s['train_seconds']:.0f} s", file=sys.stderr, flush=True)
        return {"seed": seed, "teachers": teachers, "rows": rows, "chain_seconds": t_chain,
                "metric": "fd" if images else "w2", "n_eval": n, "latency_batch": len(z_lat),
                "pairs_round": p.distill_round()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label in [r["student"] for r in runs[0]["rows"]]:
        rs = [next(r for r in run["rows"] if r["student"] == label) for run in runs]
        out.append({"student": label, "params": rs[0]["params"], "param_ratio": rs[0]["param_ratio"],
                    **{k: [r[k] for r in rs] for k in ("w2_1", "ratio_to_rf2_100", "ratio_to_rf1_100",
                                                        "latency_ms_b1", "latency_ms_b1024", "train_seconds")}})
    return out


def markdown(data: dict[str, Any]) -> str:
    runs, agg, cfg = data["runs"], data["aggregate"], data["config"]
    metric = "FD" if runs[0].get("metric") == "fd" else "W2"
    lb = runs[0].get("latency_batch", 256 if metric == "FD" else 1024)
    t2 = [r["teachers"]["rf2"]["w2_100"] for r in runs]
    t1 = [r["teachers"]["rf1"]["w2_100"] for r in runs]
    rows = [[a["student"], f"{a['params']:,} ({a['param_ratio']:.3f}×)", common.fmt_pm(a["w2_1"], 4),
             common.fmt_pm(a["ratio_to_rf2_100"]), common.fmt_pm(a["ratio_to_rf1_100"]),
             f"{common.mean_std(a['latency_ms_b1'])[0] * 1000:.1f}", f"{common.mean_std(a['latency_ms_b1024'])[0] * 1000:.2f}",
             f"{common.mean_std(a['train_seconds'])[0]:.0f}"] for a in agg]
    return "\n".join([
        (f"## Smaller one-step students on {cfg['target']}: regression, SlimFlow, MeanFlow (#17)" if not cfg.get("only")
         else f"### Smaller one-step students on {cfg['target']}: {', '.join(cfg['only'])}"), "",
        f"Reproduce: `{data['command']}`"
        + (f" (`--reuse`: the workspace of a finished `rectflow run --set data.target={cfg['target']}` of each "
           "seed, in the order of `--seeds`; its prepare, rf1, rf2, coupling rounds and `distilled`, the "
           "teacher-size row, are taken as they are)" if cfg.get("reuse") else ""), "",
        f"N(0, I) → {cfg['target']}, seeds {', '.join(str(r['seed']) for r in runs)} (mean ± std); teacher rf2 "
        f"({runs[0]['teachers']['rf2']['params']:,} parameters) {metric} at 100 Euler steps {common.fmt_pm(t2, 4)} "
        f"(rf1: {common.fmt_pm(t1, 4)}). Every student on the same round-{runs[0].get('pairs_round', 2)} pairs, "
        "one Euler step, from rf2's weights or (small ones) "
        f"`{cfg['small']}` from random weights, {cfg['steps']} steps at lr {cfg['lr']} (SlimFlow: "
        f"{cfg['slim_reflow_steps']} of them annealing reflow)."
        + (" `online (small)` reads no pairs: fresh N(0, I) every batch, the teacher-size row's one-step output "
           "as its target (`distill.teacher_model`), with the same adversarial term."
           if any(a["student"] == "online (small)" for a in agg) else "")
        + (" The regression students and `slimflow + adversarial` keep the images profile's adversarial term "
           "(weight 0.01); `slimflow` and MeanFlow run without it. FD: the evaluate stage's (its frozen feature net, against the training "
           f"split), on {runs[0].get('n_eval', 1000):,} samples per model, the same draw for every model of a seed." if metric == "FD" else "")
        + (" Overrides of every student trained here (they win over the above): "
           + ", ".join(f"`{o}`" for o in cfg["overrides"]) + "." if cfg.get("overrides") else ""),
        "",
        common.md_table(["student", "parameters", f"{metric} @1", "÷ rf2 @100", "÷ rf1 @100", "µs/sample b1",
                         f"µs/sample b{lb}", "train s"], rows),
        "",
        common.env_lines(data["env"]),
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, few pairs")
    ap.add_argument("--target", default="moons")
    ap.add_argument("--small", default=None, help="the small students' architecture (default per target)")
    ap.add_argument("--steps", type=int, default=StudentsConfig.steps)
    ap.add_argument("--lr", type=float, default=StudentsConfig.lr)
    ap.add_argument("--reuse", nargs="+", default=None,
                    help="finished workspaces, one per seed (same order): their chain and distilled are taken")
    ap.add_argument("--only", nargs="*", default=[], help="student rows to run (labels)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override for every student trained here (after the row's own), e.g. "
                         "distill.adversarial.weight=0.05; repeatable")
    ap.add_argument("--label", default=None,
                    help="name of the result and its BENCHMARKS section (default: from the target and --only)")
    ap.add_argument("--n-eval", type=int, default=None,
                    help="samples per model for the quality figure (images: default evaluate.n_samples; the same draw for every model)")
    args = ap.parse_args(argv)
    small = args.small or SMALL.get(args.target, SMALL["moons"])
    cfg = StudentsConfig(target=args.target, small=small, steps=args.steps, lr=args.lr,
                         slim_reflow_steps=args.steps // 2, only=args.only, overrides=args.overrides,
                         n_eval=args.n_eval or StudentsConfig.n_eval, n_eval_images=args.n_eval)
    for o in args.overrides:
        if "=" not in o or not o.split("=", 1)[0].startswith("distill."):
            ap.error(f"--set {o}: expected distill.KEY=VALUE (the students are the distill stage's)")
    from rectflow.errors import InputError
    from rectflow.params import load_params

    try:  # unknown keys and bad values: one line now, not after the first seed's minutes
        load_params(common.PARAMS, [f"data.target={args.target}", *args.overrides])
        common.result_label(args.label)
    except (InputError, ValueError) as e:
        ap.error(str(e))
    if args.n_eval is not None and args.n_eval < 2:
        ap.error(f"--n-eval {args.n_eval}: need at least 2 samples")
    if args.reuse is not None and len(args.reuse) != len(args.seeds):
        ap.error(f"--reuse: one workspace per seed, got {len(args.reuse)} for {len(args.seeds)} seed(s)")
    for w, seed in zip(args.reuse or [], args.seeds):  # before the first (long) run, one line each
        from rectflow.errors import InputError

        try:
            made = common.workspace_params(Path(w)).seed
        except InputError as e:
            ap.error(f"--reuse {w}: {e}")
        if made != seed:
            ap.error(f"--reuse {w}: a run of seed {made}, not of seed {seed} (give one workspace per seed, "
                     "in the order of --seeds)")
    if args.quick:
        cfg = replace(cfg, steps=40, slim_reflow_steps=20, n_eval=500, n_eval_images=None,  # --only, --set kept
                      repeats=2, extra=["pretrain.steps=30", "reflow.steps=30", "couple.n_pairs=2000",
                                          "couple.shard_size=1000", "couple.batch_size=1000", "couple.solver=euler",
                                          "couple.steps=10", "couple.reflowed.steps=10", "distill.steps=40",
                                          "distill.checkpoint_every=1000"])
    common.set_threads()
    env = common.environment()
    reuse = args.reuse or [None] * len(args.seeds)
    runs = [run(replace(cfg, reuse=r), s) for s, r in zip(args.seeds, reuse)]
    data = {"config": cfg.__dict__ | {"reuse": args.reuse}, "runs": runs, "aggregate": aggregate(runs), "env": env,
            "command": "python -m benchmarks.students " + shlex.join(argv if argv is not None else sys.argv[1:])}
    name = NAME if args.target == "moons" else f"{NAME}_{args.target}"
    if args.label:
        name += "_" + args.label
    elif args.only:  # a subset of the rows: a result (and section) of its own, beside the full one
        name += "_" + "_".join(re.sub(r"[^a-z0-9]+", "_", o.lower()).strip("_") for o in args.only)
    common.publish(name, data, markdown(data), args.quick)
    print(json.dumps(data["aggregate"], indent=1, default=str))
    return data


if __name__ == "__main__":
    main()
