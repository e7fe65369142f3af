"""Benchmarks of rectflow, run by hand (``make bench`` = ``python -m benchmarks.run_all``).

Each module measures one thing through the project's own code paths (the stages of ``tasks/`` via
:func:`tasks.runner.run_stage` in a temporary workspace, or the core functions they call), writes
``benchmarks/results/NAME.json`` and its section of ``BENCHMARKS.md`` (with the command that
reproduces it), and prints a markdown table:

- :mod:`benchmarks.quality_2d`: W2 against NFE on five 2D tasks, rectflow's methods and the peers
  (torchcfm I-CFM / OT-CFM, Meta's flow_matching), 3 seeds.
- :mod:`benchmarks.throughput`: ``couple`` pairs/s against the network's raw forward rate / NFE;
  training samples/s against a bare forward + backward + step loop.
- :mod:`benchmarks.overhead`: ``rectflow run`` (Prefect, MLflow, DVC) against its stages' compute.
- :mod:`benchmarks.quantization`: latency, bytes and ΔW2 of the int8 and bf16 one-step models.

Timings depend on the machine and its load: every result records both (``/proc/loadavg``).
"""
