"""How much of a digits FD figure is the estimator: spread over disjoint draws, and large-sample ratios.

evaluate scores image models by FD against the training split with ``evaluate.n_samples`` (1,000 for
the images profile) generated samples. This benchmark takes finished workspaces (one per seed, each
a ``rectflow run --set data.target=digits`` that has finished) and, with each workspace's own frozen
feature net:

1. draws ``--n`` (10,000) source samples from a fixed seed and integrates each model on the same
   draw: flows with ``--steps`` (100) Euler steps, students with their one step (fp32, as evaluate);
2. scores FD on all of them (**large-sample FD**), and on ``--n // --subset`` disjoint subsets of
   ``--subset`` (1,000, evaluate's size): **mean ± std over subsets** (the spread one evaluate row
   carries) and the **paired ratio** student ÷ reference flow per subset (the same noise for both,
   as evaluate pairs them), and the bootstrap standard error that evaluate reports (``fd_se``) of
   the first subset, to compare with the real spread;
3. puts evaluate's own figure (``metrics/eval.json``) beside them.

Run: ``python -m benchmarks.fd_noise --workspaces SEED0_DIR SEED1_DIR SEED2_DIR``. Each model's
features are cached in ``benchmarks/results/.cache/fd_noise`` under the sha256 of its weights, of the
feature net and of the draw (``--fresh`` ignores the cache): a rerun integrates only what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

NAME = "fd_noise"


def fd_extrapolated(f: np.ndarray, ref: np.ndarray, sizes: list[int]) -> tuple[float, list[float]]:
    """FD at infinitely many samples (Chong & Forsyth 2020, "Effectively unbiased FID"): the FD of
    ``f: (n, F)`` against ``ref`` is, to first order, FD∞ + c/size; fit that line by least squares
    to the mean FD over the disjoint subsets of each of ``sizes`` (≥ 2 distinct sizes ≤ n) and
    return its intercept FD∞ and the means it was fitted to."""
    from rectflow.fd import frechet_distance

    if len(set(sizes)) < 2 or max(sizes) > len(f):
        raise ValueError(f"fd_extrapolated: need 2 distinct sizes ≤ {len(f)}, got {sizes}")
    means = [float(np.mean([frechet_distance(f[k:k + m], ref) for k in range(0, len(f) - m + 1, m)])) for m in sizes]
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, dtype=float), np.asarray(means), 1)
    return float(intercept), means


def extrapolation_sizes(n: int, subset: int) -> list[int]:
    """The subset sizes of the FD∞ fit: ``subset``, 2·``subset``, 5·``subset`` … up to ``n`` (those ≤ n)."""
    return sorted({m for m in (subset, 2 * subset, 5 * subset, n) if m <= n})


def subset_figures(feats: dict[str, np.ndarray], ref: np.ndarray, subset: int, reference: str) -> dict[str, Any]:
    """FD of every model's features ``(n, F)`` against ``ref: (m, F)``: on all ``n``, on the
    ``n // subset`` disjoint subsets (rows ``[k·subset, (k+1)·subset)``, the same rows of the same
    draw for every model), extrapolated to infinitely many samples (:func:`fd_extrapolated`, when
    n ≥ 2·subset), and each model's paired ratio to ``reference`` per subset, on all and at ∞.
    The finite-n FD carries a positive bias ~ c/n shared by every model, which pulls every ratio
    towards 1: a ratio at 1,000 samples reads smaller than the same models' ratio at 10,000."""
    from rectflow.fd import frechet_distance, frechet_distance_se

    n = min(len(f) for f in feats.values())
    if n < subset:
        raise ValueError(f"subset_figures: {n} samples, fewer than one subset of {subset}")
    out: dict[str, Any] = {}
    for name, f in feats.items():
        subs = [frechet_distance(f[k:k + subset], ref) for k in range(0, n - subset + 1, subset)]
        out[name] = {"fd_all": frechet_distance(f[:n], ref), "fd_subsets": subs,
                     "se_first_subset": frechet_distance_se(f[:subset], ref)}
        sizes = extrapolation_sizes(n, subset)
        if len(sizes) >= 2:
            out[name]["fd_inf"], out[name]["fd_inf_fit"] = fd_extrapolated(f[:n], ref, sizes)
            out[name]["fd_inf_sizes"] = sizes
    for name, rec in out.items():
        base = out[reference]
        rec["ratio_all"] = rec["fd_all"] / base["fd_all"]
        rec["ratio_subsets"] = [a / b for a, b in zip(rec["fd_subsets"], base["fd_subsets"])]
        if "fd_inf" in rec:
            rec["ratio_inf"] = rec["fd_inf"] / base["fd_inf"]
    return out


FD_NOISE_SEED_OFFSET = 10_000  # its own draw, apart from evaluate's (seed + 10,007)
# Features of each model's samples, keyed by the model's weights, the feature net's, the draw and the
# steps: a rerun (another label, one more model) integrates only what changed. Not in git.
CACHE = common.RESULTS / ".cache" / NAME


def cached_features(key: str, make: Any, use_cache: bool = True) -> np.ndarray:
    """``make()`` (an ``(n, F)`` array), stored under ``CACHE/key.npy`` (temporary name, then rename)
    and read back on the next call with the same key."""
    path = CACHE / f"{key}.npy"
    if use_cache and path.is_file():
        return np.load(path)
    out = np.asarray(make())
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def model_features(stem: Path, z: Any, steps: int, net: Any, net_sha: str, use_cache: bool = True,
                   p: Any = None) -> tuple[np.ndarray, int]:
    """Features ``(n, F)`` by ``net`` (whose weights hash to ``net_sha``) of the saved model ``stem``'s
    samples from ``z: (n, *shape)`` (fp32, in chunks of 2,500): a flow takes ``steps`` Euler steps, a
    student its one; and that NFE (Euler steps). A conditional model generates row i for label
    i mod K as evaluate does (:func:`tasks.classes.eval_labels`; in chunks of a multiple of K), at
    evaluate's guidance scale for it under the workspace's params ``p``
    (:func:`tasks.evaluate.guidance_of`; 1 without ``p``). Cached (:func:`cached_features`) by the
    model's weights, the feature net's, the draw and, for a conditional model, K and w."""
    from rectflow.fd import extract_features
    from rectflow.io import file_sha256
    from rectflow.models import load_model
    from tasks.classes import bind_eval_labels
    from tasks.evaluate import guidance_of

    model, card = load_model(stem, "cpu")
    k = steps if card["meta"].get("role", "flow") == "flow" else 1
    classes = int(card["arch"].get("classes", 0))
    w = guidance_of(p, stem.name, card) if p is not None else 1.0
    model = bind_eval_labels(model, card, w)
    draw = hashlib.sha256(z.numpy().tobytes()).hexdigest()[:16]
    key = f"{file_sha256(stem.with_suffix('.safetensors'))[:16]}-{net_sha[:16]}-{draw}-euler{k}"
    key += f"-y{classes}-w{w:g}" if classes else ""

    chunk = 2500 - 2500 % classes if classes else 2500  # a multiple of K: row i keeps label i mod K

    def make() -> np.ndarray:
        return extract_features(net, common.solve_chunked(model, z, k, chunk).numpy())

    return cached_features(key, make, use_cache), k


def check_workspace(root: Path, models: list[str], flag: str = "--workspaces", extra: tuple[str, ...] = ("metrics/eval.json",)) -> None:
    """InputError with one line (naming ``flag``) for the first thing a finished digits workspace
    lacks: its resolved params, the frozen feature net, a model of ``models``, the files ``extra``."""
    from rectflow.errors import InputError

    if not root.is_dir():
        raise InputError(f"{flag} {root}: not a directory (give finished `rectflow run --set data.target=digits` workspaces)")
    need = [root / "params.resolved.yaml", root / "data" / "prepared" / "features.safetensors",
            *(root / "models" / f"{m}.safetensors" for m in models), *(root / e for e in extra)]
    missing = next((f for f in need if not f.is_file()), None)
    if missing is not None:
        raise InputError(f"{flag} {root}: {missing.relative_to(root)} is missing (a finished image run has it; "
                         "the models are named by --models)")


def measure(root: Path, n: int, subset: int, steps: int, models: list[str], reference: str,
            use_cache: bool = True) -> dict[str, Any]:
    """The figures of one workspace: ``n`` source draws (:func:`tasks.evaluate.eval_noise` at this
    benchmark's own seed offset: N(0, I), or the source's test rows), each model integrated on the
    same draw, featurised by the workspace's feature net, then :func:`subset_figures`."""
    from rectflow.data import load_prepared
    from rectflow.fd import extract_features, load_feature_net
    from rectflow.io import file_sha256
    from rectflow.layout import Layout
    from tasks.evaluate import eval_noise

    check_workspace(root, models)
    p = common.workspace_params(root)
    prepared = root / "data" / "prepared"
    net = load_feature_net(prepared / "features")
    train = load_prepared(prepared, "target", "train").data
    ref = extract_features(net, train.numpy())
    z = eval_noise(p, Layout(root), n, tuple(train.shape[1:]), seed_offset=FD_NOISE_SEED_OFFSET)
    net_sha = file_sha256(prepared / "features.safetensors")
    feats, nfe = {}, {}
    for name in models:
        feats[name], nfe[name] = model_features(root / "models" / name, z, steps, net, net_sha, use_cache, p)
        print(f"[fd_noise] {root.name} {name}: {nfe[name]} Euler step(s) on {n:,} draws", file=sys.stderr, flush=True)
    figs = subset_figures(feats, ref, subset, reference)
    evald = json.loads((root / "metrics" / "eval.json").read_text())["rows"]
    for name in models:
        row = next((r for r in evald if r["model"] == name and r["solver"] == "euler" and r.get("schedule", "uniform")
                    == "uniform" and r["nfe"] == nfe[name]), None)
        figs[name]["evaluate_fd"] = None if row is None else row.get("fd")
        figs[name]["nfe"] = nfe[name]
    return {"workspace": str(root), "seed": p.seed, "n": n, "subset": subset, "models": figs, "reference": reference}


def markdown(data: dict[str, Any]) -> str:
    runs, ref = data["runs"], data["reference"]
    lines = [
        ("## How much of a digits FD is the estimator (FD noise)" if not data.get("label")
         else f"### Large-sample FD: {data['label'].replace('_', ' ')}"), "",
        f"Reproduce: `{data['command']}`", "",
        f"Each seed's finished workspace, its own feature net; {runs[0]['n']:,} draws per model (the same draw for "
        f"every model of a seed), FD on all of them and on {runs[0]['n'] // runs[0]['subset']} disjoint subsets of "
        f"{runs[0]['subset']:,} (evaluate's size for images). Ratios are paired: the model ÷ {ref} on the same draws. "
        f"FD∞: the FD extrapolated to infinitely many samples (Chong & Forsyth 2020): a line FD∞ + c/m fitted to the mean FD "
        f"over the disjoint subsets of m = {', '.join(f'{m:,}' for m in runs[0]['models'][ref].get('fd_inf_sizes', []))} "
        "samples; every finite-m FD carries the positive c/m, shared by all models, that pulls ratios towards 1.",
        "",
    ]
    rows = []
    for r in runs:
        for name, m in r["models"].items():
            subs, rat = m["fd_subsets"], m["ratio_subsets"]
            rows.append([r["seed"], name, m["nfe"], "–" if m["evaluate_fd"] is None else f"{m['evaluate_fd']:.4f}",
                         f"{np.mean(subs):.3f} ± {np.std(subs, ddof=1):.3f} ({min(subs):.2f} – {max(subs):.2f})",
                         f"{m['se_first_subset']:.3f}",
                         f"{m['fd_all']:.4f}", f"{m['fd_inf']:.4f}" if "fd_inf" in m else "–",
                         "–" if name == ref else f"{np.mean(rat):.3f} ± {np.std(rat, ddof=1):.3f}",
                         "–" if name == ref else f"{m['ratio_all']:.3f}",
                         "–" if name == ref or "ratio_inf" not in m else f"{m['ratio_inf']:.3f}"])
    lines.append(common.md_table(
        ["seed", "model", "NFE", "evaluate FD (1,000)", f"FD of {runs[0]['subset']:,}: mean ± std (range)",
         "bootstrap SE of one subset", f"FD of {runs[0]['n']:,}", "FD∞ (fit)", f"÷ {ref}, {runs[0]['subset']:,}: mean ± std",
         f"÷ {ref}, {runs[0]['n']:,}", f"÷ {ref}, ∞"], rows))
    lines += ["", common.env_lines(data["env"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspaces", nargs="+", required=True, help="finished digits runs, one per seed")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--subset", type=int, default=1_000)
    ap.add_argument("--steps", type=int, default=100, help="Euler steps of the flows")
    ap.add_argument("--models", nargs="+", default=["rf1", "distilled"])
    ap.add_argument("--reference", default="rf1")
    ap.add_argument("--label", default=None,
                    help="publish as fd_noise_LABEL (its own JSON and BENCHMARKS section) beside the default one")
    ap.add_argument("--fresh", action="store_true", help=f"integrate every model again (ignore {CACHE})")
    ap.add_argument("--quick", action="store_true", help="results to the quick JSON only")
    args = ap.parse_args(argv)
    if args.reference not in args.models:
        ap.error(f"--reference {args.reference} must be one of --models")
    try:
        common.result_label(args.label)
    except ValueError as e:
        ap.error(str(e))
    if args.n < args.subset:
        ap.error(f"--n {args.n} must be at least --subset {args.subset}")
    from rectflow.errors import InputError

    roots = [Path(w).resolve() for w in args.workspaces]
    try:  # every workspace checked before the first (minutes-long) measurement
        for root in roots:
            check_workspace(root, args.models)
            common.workspace_params(root)
    except InputError as e:
        ap.error(str(e))
    common.set_threads()
    env = common.environment()
    runs = [measure(root, args.n, args.subset, args.steps, args.models, args.reference, not args.fresh)
            for root in roots]
    data = {"runs": runs, "reference": args.reference, "env": env, "label": args.label,
            "command": "python -m benchmarks.fd_noise " + shlex.join(argv if argv is not None else sys.argv[1:])}
    common.publish(NAME if args.label is None else f"{NAME}_{args.label}", data, markdown(data), args.quick)
    return data


if __name__ == "__main__":
    main()
