"""Does rf2 generalise beyond its own pairs? And how accurate is each round-1 solver?

Two measurements on a finished image workspace (``rectflow run --set data.target=digits``):

1. **Fit against generalisation.** rf2 (and the one-step student) integrated from the noise Z0 of the
   round-1 pairs rf2 was trained on, and from fresh noise (fd_noise's draw), ``--n`` of each: FD of
   each against the training split, and the *paired* ratio to rf1 on the same noise (on the pairs'
   noise rf1's samples are the pairs' Z1, made by the round's own solve; on fresh noise rf1 takes
   100 Euler steps). rf2's mean squared distance to its pairs' Z1 says how closely it fits them. A
   ratio near 1 on the pairs' noise and well above 1 on fresh noise is rf2 fitting its pairs and
   missing the rest: too few pairs.
2. **Round-1 pair accuracy.** rf1 integrated by each solver from ``--n-accuracy`` draws, against
   RK45 at rtol = atol = 1e-5: MSE per dimension, NFE and seconds.
3. **Reconstruction by where the data comes from** (issue #18's measure, evaluate's
   :func:`rectflow.metrics.reconstruction`: invert by Euler, regenerate by Euler at the same steps,
   MSE per dimension): rf1 and rf2 on ``--n-recon`` held-out target rows (as evaluate), on rf1's own
   samples (the round-1 pairs' Z1) and on rf2's own samples (100 Euler steps from fresh noise). If
   rf2 / rf1 is as far from 0 on rf2's own samples as on held-out data, what limits it is rf2's
   backward field itself, not held-out data lying off the pairs.

Run: ``python -m benchmarks.reflow_fit --workspace DIR [--label NAME] [--parts fit accuracy
reconstruction]``. The fresh-noise features come from (and go to) fd_noise's cache.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

NAME = "reflow_fit"
SOLVERS: tuple[tuple[str, int], ...] = (("euler", 100), ("euler", 200), ("midpoint", 8), ("midpoint", 12),
                                        ("midpoint", 16), ("heun", 12))
PARTS = ("fit", "accuracy", "reconstruction")
RECON_STEPS = (1, 2, 4, 8)


def pair_noise(root: Path, n: int) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """The first ``n`` round-1 pairs of workspace ``root``: ``z0`` (tensor), ``z1`` (array), manifest."""
    import torch

    from rectflow.pairs import read_manifest, read_shard

    rd = root / "data" / "couplings" / "round-1"
    man = read_manifest(rd)
    shape = tuple(man["shape"])
    z0s, z1s, have = [], [], 0
    for entry in man["shards"]:
        z0, z1 = read_shard(rd, entry, shape)[:2]
        z0s.append(z0)
        z1s.append(z1)
        have += len(z0)
        if have >= n:
            break
    return torch.as_tensor(np.concatenate(z0s)[:n]).float(), np.concatenate(z1s)[:n], man


def fit_figures(root: Path, n: int, models: list[str], pairs: tuple[Any, np.ndarray, dict[str, Any]]) -> dict[str, Any]:
    """Part 1 (see the module docstring) for ``models`` (flows at 100 Euler steps, students at 1) on
    ``pairs`` (:func:`pair_noise`, at least ``n``)."""
    from benchmarks.fd_noise import FD_NOISE_SEED_OFFSET, model_features
    from rectflow.data import load_prepared
    from rectflow.fd import extract_features, frechet_distance, load_feature_net
    from rectflow.io import file_sha256
    from rectflow.layout import Layout
    from rectflow.models import load_model
    from tasks.evaluate import eval_noise

    p = common.workspace_params(root)
    prepared = root / "data" / "prepared"
    net = load_feature_net(prepared / "features")
    net_sha = file_sha256(prepared / "features.safetensors")
    train = load_prepared(prepared, "target", "train").data
    ref = extract_features(net, train.numpy())
    z0, z1, man = pairs[0][:n], pairs[1][:n], pairs[2]
    fresh = eval_noise(p, Layout(root), n, tuple(train.shape[1:]), seed_offset=FD_NOISE_SEED_OFFSET)
    base_pairs = frechet_distance(extract_features(net, z1), ref)
    base_fresh = frechet_distance(model_features(root / "models" / "rf1", fresh, 100, net, net_sha, p=p)[0], ref)
    out: dict[str, Any] = {"n": n, "round1_solver": man["solver"], "round1_pairs": man["n_pairs"],
                           "rf1": {"fd_pairs": base_pairs, "fd_fresh": base_fresh}}
    for name in models:
        t0 = time.perf_counter()
        feats_fresh, k = model_features(root / "models" / name, fresh, 100, net, net_sha, p=p)
        model, _ = load_model(root / "models" / name, "cpu")
        xp = common.solve_chunked(model, z0, k).numpy()
        fd_pairs = frechet_distance(extract_features(net, xp), ref)
        fd_fresh = frechet_distance(feats_fresh, ref)
        out[name] = {"nfe": k, "fd_pairs": fd_pairs, "fd_fresh": fd_fresh, "ratio_pairs": fd_pairs / base_pairs,
                     "ratio_fresh": fd_fresh / base_fresh, "mse_to_pairs": float(((xp - z1) ** 2).mean()),
                     "seconds": time.perf_counter() - t0}
        print(f"[reflow_fit] {name}: pairs' noise {out[name]['ratio_pairs']:.3f}x rf1, fresh {out[name]['ratio_fresh']:.3f}x",
              file=sys.stderr, flush=True)
    return out


def accuracy_figures(root: Path, n: int, solvers: tuple[tuple[str, int], ...] = SOLVERS) -> dict[str, Any]:
    """Part 2: rf1 by each ``(solver, steps)`` from ``n`` draws (seed 123) against RK45 at 1e-5."""
    import torch

    from rectflow.data import load_prepared
    from rectflow.models import load_model
    from rectflow.solvers import solve

    model, _ = load_model(root / "models" / "rf1", "cpu")
    shape = tuple(load_prepared(root / "data" / "prepared", "target", "train").data.shape[1:])
    z = torch.randn((n, *shape), generator=torch.Generator().manual_seed(123))
    rows = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        ref = solve(model, z, "rk45", None, rtol=1e-5, atol=1e-5)
        rows.append({"solver": "rk45 (1e-5)", "nfe": int(ref.nfe), "mse": 0.0, "seconds": time.perf_counter() - t0})
        for name, steps in solvers:
            t0 = time.perf_counter()
            sol = solve(model, z, name, steps)
            rows.append({"solver": f"{name} {steps}", "nfe": int(sol.nfe), "mse": float(((sol.x - ref.x) ** 2).mean()),
                         "seconds": time.perf_counter() - t0})
    return {"n": n, "rows": rows}


def reconstruction_figures(root: Path, n: int, pairs: tuple[Any, np.ndarray, dict[str, Any]],
                           steps: tuple[int, ...] = RECON_STEPS) -> dict[str, Any]:
    """Part 3: Euler reconstruction MSE of rf1 and rf2 at each of ``steps`` on ``n`` rows of each of
    held-out target data, rf1's samples (the round-1 pairs' Z1) and rf2's samples (100 Euler steps
    from fresh noise, fd_noise's draw)."""
    import torch

    from benchmarks.fd_noise import FD_NOISE_SEED_OFFSET
    from rectflow.data import load_prepared
    from rectflow.layout import Layout
    from rectflow.metrics import reconstruction
    from rectflow.models import load_model
    from tasks.evaluate import eval_noise

    p = common.workspace_params(root)
    test = load_prepared(root / "data" / "prepared", "target", "test").data[:n].float()
    rf1, _ = load_model(root / "models" / "rf1", "cpu")
    rf2, _ = load_model(root / "models" / "rf2", "cpu")
    fresh = eval_noise(p, Layout(root), n, tuple(test.shape[1:]), seed_offset=FD_NOISE_SEED_OFFSET)
    sets = {"held-out target rows": test,
            "rf1's samples (round-1 pairs' Z1)": torch.as_tensor(pairs[1][:n]).float(),
            "rf2's samples (100 Euler steps)": common.solve_chunked(rf2, fresh, 100)}
    rows = []
    with torch.inference_mode():
        for origin, x in sets.items():
            for k in steps:
                a = float(reconstruction(rf1, x, "euler", k)["mse"])
                b = float(reconstruction(rf2, x, "euler", k)["mse"])
                rows.append({"data": origin, "n": len(x), "steps": k, "rf1": a, "rf2": b, "ratio": b / a})
    return {"n": n, "rows": rows}


def markdown(data: dict[str, Any]) -> str:
    title = "## Does rf2 generalise beyond its pairs? (reflow fit)" if not data.get("label") else \
        f"### Reflow fit: {data['label'].replace('_', ' ')}"
    out = [title, "", f"Reproduce: `{data['command']}`", ""]
    fit = data.get("fit")
    if fit:
        rows = [[name, m["nfe"], f"{m['fd_pairs']:.4f}", f"{m['ratio_pairs']:.3f}", f"{m['fd_fresh']:.4f}",
                 f"{m['ratio_fresh']:.3f}", f"{m['mse_to_pairs']:.5f}"]
                for name, m in fit.items() if isinstance(m, dict) and "nfe" in m]
        s = fit["round1_solver"]
        out += [
            f"Workspace seed {data['seed']}; round 1: {fit['round1_pairs']:,} pairs by {s['name']} {s['steps']} steps. "
            f"FD of {fit['n']:,} samples against the training split, from the noise of the first {fit['n']:,} round-1 "
            f"pairs and from fresh noise (fd_noise's draw); ratios paired with rf1 on the same noise (rf1 on the pairs' "
            f"noise: the pairs' Z1, FD {fit['rf1']['fd_pairs']:.4f}; on fresh noise 100 Euler steps, FD "
            f"{fit['rf1']['fd_fresh']:.4f}).", "",
            common.md_table(["model", "NFE", "FD, pairs' noise", "÷ rf1", "FD, fresh noise", "÷ rf1",
                             "MSE to the pairs' Z1"], rows), ""]
    acc = data.get("accuracy")
    if acc:
        out += [f"Round-1 solvers on rf1 against RK45 at rtol = atol = 1e-5, {acc['n']:,} draws:", "",
                common.md_table(["solver", "NFE", "MSE per dimension", "seconds"],
                                [[r["solver"], r["nfe"], f"{r['mse']:.2e}", f"{r['seconds']:.2f}"] for r in acc["rows"]]),
                ""]
    rec = data.get("reconstruction")
    if rec:
        out += [f"Euler reconstruction (invert, then regenerate, same steps; MSE per dimension), workspace seed "
                f"{data['seed']}, up to {rec['n']:,} rows of each origin (n per row in the JSON):", "",
                common.md_table(["data", "Euler steps", "rf1", "rf2", "rf2 ÷ rf1"],
                                [[r["data"], r["steps"], f"{r['rf1']:.4g}", f"{r['rf2']:.4g}", f"{r['ratio']:.3f}"]
                                 for r in rec["rows"]]), ""]
    return "\n".join([*out, common.env_lines(data["env"])])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", required=True, help="a finished image run")
    ap.add_argument("--n", type=int, default=10_000, help="samples per model and noise (≤ the round-1 pairs)")
    ap.add_argument("--n-accuracy", type=int, default=500)
    ap.add_argument("--models", nargs="+", default=["rf2", "distilled"])
    ap.add_argument("--n-recon", type=int, default=300, help="rows of each origin in the reconstruction part")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--label", default=None, help="publish as reflow_fit_LABEL")
    ap.add_argument("--quick", action="store_true", help="results to the quick JSON only")
    args = ap.parse_args(argv)
    from benchmarks.fd_noise import check_workspace
    from rectflow.errors import InputError
    from rectflow.pairs import read_manifest

    root = Path(args.workspace).resolve()
    try:  # every input checked before the first (minutes-long) integration
        common.result_label(args.label)
        check_workspace(root, ["rf1", "rf2", *args.models], "--workspace", ("data/couplings/round-1/manifest.json",))
        seed = common.workspace_params(root).seed
        have = read_manifest(root / "data" / "couplings" / "round-1")["n_pairs"]
    except (InputError, ValueError) as e:
        ap.error(str(e))
    if not 2 <= args.n <= have:
        ap.error(f"--n {args.n}: expected 2 to the round's {have:,} pairs")
    if args.n_accuracy < 1:
        ap.error(f"--n-accuracy {args.n_accuracy}: expected at least 1")
    if not 1 <= args.n_recon <= have:
        ap.error(f"--n-recon {args.n_recon}: expected 1 to the round's {have:,} pairs")
    common.set_threads()
    env = common.environment()
    parts = set(args.parts)
    need = max([args.n] * ("fit" in parts) + [args.n_recon] * ("reconstruction" in parts), default=0)
    pairs = pair_noise(root, need) if need else None  # the round-1 shards read once for both parts
    data = {"seed": seed, "label": args.label, "env": env,
            "fit": fit_figures(root, args.n, args.models, pairs) if "fit" in parts else None,
            "accuracy": accuracy_figures(root, args.n_accuracy) if "accuracy" in parts else None,
            "reconstruction": reconstruction_figures(root, args.n_recon, pairs) if "reconstruction" in parts else None,
            "command": "python -m benchmarks.reflow_fit " + shlex.join(argv if argv is not None else sys.argv[1:])}
    common.publish(NAME if args.label is None else f"{NAME}_{args.label}", data, markdown(data), args.quick)
    return data


if __name__ == "__main__":
    main()
