"""rectflow: a production pipeline for rectified-flow generative models.

Time convention (the only one used anywhere in this package; never flip it)
---------------------------------------------------------------------------
``x0`` is the *source* sample (noise, or any data set π0), ``x1`` the *target* sample (data, π1).
For ``t`` in [0, 1] the straight path is::

    x_t = t · x1 + (1 − t) · x0

the velocity network ``v(x, t)`` regresses the target ``x1 − x0``, and sampling integrates
``dz/dt = v(z, t)`` from ``t = 0`` (source) to ``t = 1`` (target). A one-step generator is
``x1 = x0 + v(x0, 0)``. Reflow pairs are ``(Z0, Z1 = ODE(Z0))`` (Liu et al., "Flow Straight and
Fast", 2022).

Layers
------
``rectflow`` (this package) is the core library: math, data, networks, solvers, training, I/O, params
and the stage registry. It imports no orchestration (Prefect, MLflow, DVC, Dask) and nothing of
``tasks/`` (one thin module per stage, and the runner) or ``flows/`` (the CLI, Prefect, MLflow,
Dask). Imports point one way: core ← stages ← runner ← CLI / orchestration (README, "Layout").
"""

__version__ = "0.1.0"
