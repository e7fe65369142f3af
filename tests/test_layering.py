"""One source of truth: the import graph points one way, and dvc.yaml is what the registry generates.

* no import cycle anywhere in the shipped packages (imports inside functions count);
* the core (``rectflow``) imports nothing of the stages, the orchestration, Prefect, MLflow or DVC,
  and importing every core module leaves none of them in ``sys.modules``;
* the committed ``dvc.yaml`` equals the one generated for the committed ``params.yaml``;
* every project module a stage really imports when it runs is among its declared code deps
  (``python -X importtime``, an independent check of the AST closure);
* touching each core module makes ``dvc status`` report every stage that imports it (and no other).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rectflow.codedeps import closure, cycles, graph, module_files
from rectflow.dvcyaml import RUNNER, generate, render
from rectflow.params import load_params
from rectflow.stages import REGISTRY, STAGES

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("prefect", "mlflow", "dvc", "flows", "tasks", "dask", "distributed")


def test_no_import_cycles():
    assert cycles(graph(ROOT)) == []


def test_the_core_imports_no_stage_and_no_orchestration():
    g = graph(ROOT)
    bad = {m: sorted(t for t in deps if not t.startswith("rectflow")) for m, deps in g.items() if m.startswith("rectflow")}
    assert {m: d for m, d in bad.items() if d} == {}
    # tasks (stages, runner) may import the core only
    up = {m: sorted(t for t in deps if t.startswith("flows")) for m, deps in g.items() if m.startswith("tasks")}
    assert {m: d for m, d in up.items() if d} == {}
    # third-party orchestration, anywhere in a core module's source (imports inside functions too)
    import ast

    for name, path in module_files(ROOT, ("rectflow",)).items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for m in mods:
                assert m.split(".")[0] not in ORCHESTRATION, f"{name} imports {m}"


def test_importing_every_core_module_loads_no_orchestration():
    mods = sorted(module_files(ROOT, ("rectflow",)))
    code = ("import importlib, sys, json\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted({{k.split('.')[0] for k in sys.modules}} & set({list(ORCHESTRATION)!r}))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_committed_dvc_yaml_is_the_generated_one():
    p = load_params(ROOT / "params.yaml")
    assert (ROOT / "dvc.yaml").read_text() == render(generate(p, ROOT)), "run `rectflow dvc-yaml` and commit dvc.yaml"


def test_generated_outputs_follow_the_params():
    p = load_params(ROOT / "params.yaml", ["reflow.rounds=2", "distill.k=4", "quantize.variants=[int8]"])
    st = generate(p, ROOT)["stages"]
    outs = lambda s: [o if isinstance(o, str) else next(iter(o)) for o in st[s].get("outs", [])]  # noqa: E731
    assert {"models/rf2.safetensors", "models/rf3.safetensors", "data/couplings/round-3"} <= set(outs("reflow"))
    assert "data/couplings/round-3" in st["distill"]["deps"] and "models/rf3.safetensors" in st["distill"]["deps"]
    assert "models/distilled-k4.safetensors" in outs("distill")
    assert "models/distilled-k4-int8.safetensors" in outs("quantize")
    assert not any("bf16" in o or "int4" in o for o in outs("quantize"))
    assert {"models/rf3.safetensors", "models/distilled-k4-int8.safetensors"} <= set(st["evaluate"]["deps"])


@pytest.mark.parametrize("name", [s for s in STAGES])
def test_what_a_stage_imports_at_run_time_is_a_declared_dep(name):
    """``-X importtime`` lists every module the process imported; a run-time import of a project
    module outside the declared deps would be a stale-stage bug (imports inside functions count)."""
    declared = set(closure(ROOT, [f"tasks.{name}", RUNNER]))
    code = ("import importlib; m = importlib.import_module('tasks.%s'); import tasks.runner as r; r.user_errors()" % name)
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    files = module_files(ROOT)
    seen = {m.strip() for m in re.findall(r"\|\s+([\w.]+)\s*$", out.stderr, flags=re.M)}
    used = {files[m].relative_to(ROOT).as_posix() for m in seen if m in files}
    assert used - declared == set()


@pytest.mark.slow
def test_touching_a_core_module_reruns_exactly_its_importers(tmp_path):
    """A workspace with a complete dvc.lock (``dvc commit`` of the declared outputs, made as files
    here: no training); append a comment to each core module in turn: ``dvc status`` names exactly
    the stages whose code deps hold it."""
    from tests.workspace import clone_workspace, env

    ws = clone_workspace(tmp_path / "ws")
    run = lambda *a: subprocess.run(a, cwd=ws, env=env(), capture_output=True, text=True, timeout=300)  # noqa: E731
    assert (ws / ".dvc").is_dir() or run(sys.executable, "-m", "dvc", "init", "-q").returncode == 0
    p = load_params(ws / "params.yaml")
    from rectflow.params import write_resolved_params

    write_resolved_params(p, ws)
    doc = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    for s in REGISTRY:  # stand-in outputs: dvc status compares hashes, not how they were made
        for o in s.outputs(p):
            path = ws / o.path
            if path.exists():
                continue
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n" if path.suffix == ".json" else "x\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text("x\n")
    out = run(sys.executable, "-m", "dvc", "commit", "-f", "-q")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "up to date" in run(sys.executable, "-m", "dvc", "status").stdout

    from dvc.repo import Repo

    core = sorted(f.relative_to(ROOT).as_posix() for f in module_files(ROOT, ("rectflow",)).values())
    for rel in core:
        target = ws / rel
        original = target.read_bytes()
        target.write_bytes(original + b"\n# touched\n")
        try:
            with Repo(str(ws)) as repo:
                changed = {k.split(":")[-1] for k in repo.status()}
        finally:
            target.write_bytes(original)
        importers = {name for name, e in doc.items() if rel in e["deps"]}
        assert changed == importers, rel  # a module no stage imports (rectflow/guard.py) reruns nothing
    shutil.rmtree(ws, ignore_errors=True)
