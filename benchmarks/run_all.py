"""``make bench``: the benchmarks in turn (quality, throughput, overhead, quantization, the U-Net's speed).

``python -m benchmarks.run_all [--quick] [--only NAME ...] [--jobs N] [--wait-for-quiet SECONDS]``.
Each writes ``benchmarks/results/NAME.json`` and its section of ``BENCHMARKS.md`` (``--quick``: a
smoke run that writes ``NAME.quick.json`` only). The timing benchmarks run after the quality suite,
each optionally waiting for a quiet machine first; a failing benchmark is reported and the others
still run (exit status 1 at the end). ``--only`` also accepts the long benchmarks that are not run
by default: ``ablation_digits`` (the reflow ablation on digits, eight U-Net trainings).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from benchmarks import common

ORDER = ("quality_2d", "throughput", "overhead", "quantization", "unet")
OPTIONAL = ("ablation_digits",)  # run only when named with --only


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-sized runs (minutes), results in NAME.quick.json")
    ap.add_argument("--only", nargs="+", choices=ORDER + OPTIONAL, default=list(ORDER))
    ap.add_argument("--jobs", type=int, default=None, help="parallel jobs of the quality suite")
    ap.add_argument("--wait-for-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each timing benchmark, wait up to SECONDS for the 1-minute load to drop below 0.5")
    ap.add_argument("--require-quiet", action="store_true",
                    help="skip a timing benchmark whose machine is still busy after the wait (see --wait-for-quiet)")
    args = ap.parse_args(argv)
    failed = []
    for name in [n for n in ORDER + OPTIONAL if n in args.only]:
        sub = ["--quick"] if args.quick else []
        if name == "quality_2d" and args.jobs:
            sub += ["--jobs", str(args.jobs)]
        if name != "quality_2d" and args.wait_for_quiet > 0:
            sub += ["--wait-for-quiet", str(args.wait_for_quiet)]
        if name != "quality_2d" and args.require_quiet:
            sub += ["--require-quiet"]
        print(f"\n===== {name} {' '.join(sub)} (load {common.load_line(common.loadavg())}) =====", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            module = __import__(f"benchmarks.{name}", fromlist=["main"])
            data = module.main(sub)
            if name == "overhead" and "error" in data.get("result", {}):
                failed.append(name)
        except SystemExit as e:  # --require-quiet on a busy machine, or a usage error
            if e.code:
                failed.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"===== {name}: {time.perf_counter() - t0:.0f} s =====", file=sys.stderr, flush=True)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
