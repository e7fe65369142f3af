"""Secrets in URLs (and the AWS variables) never reach a log, a param, an artifact or a file.

Through the real ``rectflow`` command, no mocks:

* params that would hold a secret in a URL (``tracking.mlflow_uri``, ``storage.endpoint_url``,
  ``couple.dask_address``, any other string key, in ``--set`` or in ``params.yaml``) are refused: exit
  2, one line naming the key and where the client takes credentials from, the secret not in it, the
  workspace byte-for-byte unchanged;
* URL-valued variables whose client takes no credentials from a URL (Dask, the S3 endpoints) are
  refused the same way;
* the secrets harness: tiny real runs with distinctive credentials in every URL-valued setting that
  may hold one (``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``) and in ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``; then every byte of the workspace (``.dvc/``,
  ``dvc.lock``, ``params*.yaml``, ``mlflow.db``, ``mlruns/``), of Prefect's home (its database) and
  of the MLflow server's store, and the run's stdout and stderr, is searched for them: zero hits.
  One run falls back from an MLflow server that does not answer (the warning names the bare URL);
  the other logs to a real MLflow server behind a basic-auth gateway and a real Prefect server with
  an auth string, so the credentials demonstrably reach both clients.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from rectflow import secrets
from tests.workspace import BIN, clone_workspace, free_port, rectflow

# ---- the redaction functions ----------------------------------------------------------------------


def test_redact_url_and_text():
    assert secrets.redact_url("http://bob:hunter2@mlflow:5000/x?a=1") == "http://***@mlflow:5000/x?a=1"
    assert secrets.redact_url("https://h/p?token=abc&x=1&X-Amz-Signature=zz") == "https://h/p?token=***&x=1&X-Amz-Signature=***"
    assert secrets.redact_url("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert secrets.redact_url("tcp://host:8786") == "tcp://host:8786"
    env = {"AWS_SECRET_ACCESS_KEY": "wJalrFAKEKEY", "PWD": "/work/somewhere", "GIT_AUTHOR_NAME": "rectflow dev",
           "HTTP_PROXY": "http://px:proxypass9@proxy:3128", "PREFECT_API_AUTH_STRING": "pu:prefpass7"}
    text = ("x http://u:p%40ss@h:1/ 'https://k:s@b' wJalrFAKEKEY proxypass9 prefpass7 /work/somewhere rectflow dev")
    assert secrets.redact_text(text, env) == "x http://***@h:1/ 'https://***@b' *** *** *** /work/somewhere rectflow dev"


def test_split_environment_moves_url_credentials_into_the_clients_variables():
    env = {"MLFLOW_TRACKING_URI": "http://mu:m%2Fpass@127.0.0.1:5000", "PREFECT_API_URL": "http://pu:ppass@h:4200/api"}
    assert secrets.split_environment(env) == ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"]
    assert env == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "PREFECT_API_URL": "http://h:4200/api",
                   "MLFLOW_TRACKING_USERNAME": "mu", "MLFLOW_TRACKING_PASSWORD": "m/pass",
                   "PREFECT_API_AUTH_STRING": "pu:ppass"}
    assert secrets.split_environment(env) == []  # idempotent
    for name, value in [("RECTFLOW_DASK_ADDRESS", "tcp://u:SECRETX@h:8786"), ("AWS_ENDPOINT_URL", "http://k:SECRETX@h"),
                        ("MLFLOW_TRACKING_URI", "http://h/?token=SECRETX")]:
        with pytest.raises(secrets.SplitError, match=f"^{name}: must not contain") as e:
            secrets.split_environment({name: value})
        assert "SECRETX" not in str(e.value)


def test_redacting_stream_blanks_secrets_split_across_writes():
    import io

    inner = io.StringIO()
    s = secrets.RedactingStream(inner)
    for part in ("MLflow http://", "user:hunter22", "@host:1 down\n", "tail http://a:b@c"):
        s.write(part)
    s.flush()
    assert inner.getvalue() == "MLflow http://***@host:1 down\ntail http://***@c"


def test_deployment_form_schema_refuses_url_credentials():
    """What the Prefect server checks a UI form's parameters against, before it creates the run."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from flows.pipeline import pipeline
    from rectflow.config import Params, dump_params

    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    validate({"params": dump_params(Params())}, schema, raise_on_error=True)
    for section, key, value in [("tracking", "mlflow_uri", "http://u:SECRETX@h:5000"),
                                ("couple", "dask_address", "tcp://u:SECRETX@h:8786"),
                                ("storage", "endpoint_url", "https://k:SECRETX@s3.example")]:
        form = dump_params(Params())
        form[section][key] = value
        with pytest.raises(ValidationError, match=f"params.{section}.{key}"):
            validate({"params": form}, schema, raise_on_error=True)


# ---- refusals through the CLI ---------------------------------------------------------------------


def snapshot(ws: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(ws):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), ws)] = "dir"
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(ws))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def plain_ws(tmp_path_factory):
    return clone_workspace(tmp_path_factory.mktemp("secrets-refusals"))


SECRET = "Rf-" + uuid.uuid4().hex[:12]

PARAM_CASES = [  # (--set, key named, hint in the line)
    (f"tracking.mlflow_uri=http://rfuser:{SECRET}@127.0.0.1:1", "tracking.mlflow_uri", "MLFLOW_TRACKING_PASSWORD"),
    (f"tracking.mlflow_uri=https://mlflow.example/?access_token={SECRET}", "tracking.mlflow_uri", "MLFLOW_TRACKING_TOKEN"),
    (f"storage.endpoint_url=http://AKIAX:{SECRET}@127.0.0.1:9000", "storage.endpoint_url", "AWS_SECRET_ACCESS_KEY"),
    (f"couple.dask_address=tcp://dask:{SECRET}@127.0.0.1:8786", "couple.dask_address", "TLS"),
    (f"data.target_path=s3://AKIAX:{SECRET}@bucket/x.npy", "data.target_path", "environment"),
    (f"couple.solver=http://u:{SECRET}@h", "couple.solver", "Input should be"),
]


@pytest.mark.parametrize("override,key,hint", PARAM_CASES, ids=[c[1] + str(i) for i, c in enumerate(PARAM_CASES)])
def test_secret_in_a_params_url_is_refused_in_one_line(plain_ws, override, key, hint):
    before = snapshot(plain_ws)
    r = rectflow("run", "--set", override, cwd=plain_ws, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rectflow: error: params.yaml: {key}: "), r.stderr
    assert hint in lines[0], lines[0]
    assert SECRET not in r.stdout + r.stderr
    assert snapshot(plain_ws) == before


def test_secret_in_params_yaml_is_refused_by_every_command(plain_ws):
    text = (plain_ws / "params.yaml").read_text()
    try:
        (plain_ws / "params.yaml").write_text(text + f"tracking:\n  mlflow_uri: http://rfuser:{SECRET}@mlflow:5000\n")
        before = snapshot(plain_ws)
        for args in (["run"], ["stage", "prepare"], ["params"], ["dvc-yaml"]):
            r = rectflow(*args, cwd=plain_ws, timeout=120)
            assert r.returncode == 2, (args, r.stderr)
            assert r.stderr.startswith("rectflow: error: params.yaml: tracking.mlflow_uri: must not contain credentials")
            assert len(r.stderr.strip().splitlines()) == 1 and SECRET not in r.stdout + r.stderr, r.stderr
        assert snapshot(plain_ws) == before
    finally:
        (plain_ws / "params.yaml").write_text(text)


ENV_CASES = [
    ("RECTFLOW_DASK_ADDRESS", f"tcp://dask:{SECRET}@127.0.0.1:8786", "TLS"),
    ("RECTFLOW_S3_ENDPOINT_URL", f"http://AKIAX:{SECRET}@127.0.0.1:9000", "AWS_SECRET_ACCESS_KEY"),
    ("AWS_ENDPOINT_URL", f"http://AKIAX:{SECRET}@127.0.0.1:9000", "AWS_SECRET_ACCESS_KEY"),
    ("AWS_ENDPOINT_URL_S3", f"http://AKIAX:{SECRET}@127.0.0.1:9000", "AWS_SECRET_ACCESS_KEY"),
    ("MLFLOW_S3_ENDPOINT_URL", f"http://AKIAX:{SECRET}@127.0.0.1:9000", "AWS_SECRET_ACCESS_KEY"),
    ("MLFLOW_TRACKING_URI", f"https://mlflow.example/?token={SECRET}", "MLFLOW_TRACKING_TOKEN"),
    ("PREFECT_API_URL", f"http://127.0.0.1:1/api?api_key={SECRET}", "PREFECT_API_KEY"),
]


@pytest.mark.parametrize("name,value,hint", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_secret_in_a_url_variable_without_a_credential_mechanism_is_refused(plain_ws, name, value, hint):
    before = snapshot(plain_ws)
    r = rectflow("run", cwd=plain_ws, timeout=120, **{name: value})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rectflow: error: {name}: must not contain "), r.stderr
    assert hint in lines[0] and SECRET not in r.stdout + r.stderr, lines[0]
    assert snapshot(plain_ws) == before


# ---- the secrets harness: tiny real runs, then grep everything --------------------------------------


def fake_secrets() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {name: f"{name.lower()}-{tag}" for name in
            ("mlflow_password", "prefect_password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")}


def needles(fake: dict[str, str], users: dict[str, str]) -> list[bytes]:
    """Each secret as it could be written: raw, URL-encoded-free anyway (they are [a-z0-9_-]), and
    the base64 of USER:PASSWORD (a Basic header written somewhere)."""
    out = [v.encode() for v in fake.values()]
    for user, pw in ((users["mlflow"], fake["mlflow_password"]), (users["prefect"], fake["prefect_password"])):
        out.append(base64.b64encode(f"{user}:{pw}".encode()))
    return out


def grep_tree(root: Path, needles_: list[bytes]) -> list[str]:
    hits = []
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file():
                continue
            data = p.read_bytes()
            hits += [f"{p}: {n.decode()}" for n in needles_ if n in data]
    return hits


def aws_env(fake: dict[str, str]) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": fake["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": fake["aws_secret_access_key"],
            "AWS_SESSION_TOKEN": fake["aws_session_token"], "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    from tests.support.tiny import TINY

    return clone_workspace(tmp_path_factory.mktemp("secrets-ws"), list(TINY))


@pytest.mark.slow
def test_unreachable_mlflow_with_credentials_fails_in_one_line_without_them(plain_ws, tmp_path):
    fake = fake_secrets()
    port = free_port()  # nothing listens there
    r = rectflow("run", "--set", "tracking.on_unreachable=fail", cwd=plain_ws, timeout=300,
                 MLFLOW_TRACKING_URI=f"http://rfuser:{fake['mlflow_password']}@127.0.0.1:{port}",
                 PREFECT_HOME=str(tmp_path / "prefect"), **aws_env(fake))
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"rectflow: error: tracking.mlflow_uri: MLflow server http://127.0.0.1:{port} does not answer"), r.stderr
    hits = grep_tree(tmp_path, needles(fake, {"mlflow": "rfuser", "prefect": "-"})) + grep_tree(plain_ws, needles(fake, {"mlflow": "rfuser", "prefect": "-"}))
    assert not hits and not any(n.decode() in r.stdout + r.stderr for n in needles(fake, {"mlflow": "rfuser", "prefect": "-"})), hits
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=plain_ws, check=True)


@pytest.mark.slow
def test_secrets_harness_fallback_run_leaks_nothing(tiny_ws, tmp_path):
    """The issue's case: a password in the MLflow URI of a server that does not answer."""
    fake = fake_secrets()
    port = free_port()
    home = tmp_path / "prefect-home"
    r = rectflow("run", "--verbose", cwd=tiny_ws, timeout=900, PREFECT_HOME=str(home),
                 MLFLOW_TRACKING_URI=f"http://rfuser:{fake['mlflow_password']}@127.0.0.1:{port}", **aws_env(fake))
    assert r.returncode == 0, r.stderr[-4000:]
    assert (f"rectflow: warning: MLflow server http://127.0.0.1:{port} does not answer; logging to "
            "sqlite:///mlflow.db instead") in r.stderr
    assert (tiny_ws / "mlflow.db").is_file() and (home / "prefect.db").is_file()
    n = needles(fake, {"mlflow": "rfuser", "prefect": "-"})
    hits = grep_tree(tiny_ws, n) + grep_tree(home, n)
    hits += [f"output: {x.decode()}" for x in n if x.decode() in r.stdout + r.stderr]
    assert not hits, hits


# A basic-auth gateway in front of a real `mlflow server` (the MLflow basic-auth app needs Flask-WTF,
# which is not installed): it refuses any request without the right Authorization header.


class _Gateway(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: int, auth: str) -> None:
        self.upstream, self.expected = upstream, "Basic " + base64.b64encode(auth.encode()).decode()
        self.authorized = self.refused = 0
        self.counter_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _GatewayHandler)


class _GatewayHandler(http.server.BaseHTTPRequestHandler):
    server: _Gateway

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _relay(self) -> None:
        body = self._body()
        if self.headers.get("Authorization") != self.server.expected:
            with self.server.counter_lock:
                self.server.refused += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with self.server.counter_lock:
            self.server.authorized += 1
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "authorization", "transfer-encoding", "connection", "content-length")}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=120)
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _relay


def _wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
    raise RuntimeError(f"{url} not healthy in {seconds} s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.slow
def test_secrets_harness_with_authenticated_servers_leaks_nothing(tiny_ws, tmp_path):
    """Credentials in MLFLOW_TRACKING_URI and PREFECT_API_URL reach both servers (each refuses a
    request without them), and are written nowhere."""
    from tests.workspace import env

    fake = fake_secrets()
    users = {"mlflow": "rf-mlflow-user", "prefect": "rf-prefect-user"}
    mdir, pdir, chome = tmp_path / "mlflow-server", tmp_path / "prefect-server", tmp_path / "client-prefect-home"
    for d in (mdir, pdir, chome):
        d.mkdir()
    mport, pport = free_port(), free_port()
    mlflow_proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{mdir / 'mlflow.db'}",
         "--artifacts-destination", str(mdir / "artifacts"), "--host", "127.0.0.1", "--port", str(mport),
         "--workers", "1"],
        cwd=mdir, env=env(), stdout=open(mdir / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    pe = env(PREFECT_HOME=str(pdir), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
             PREFECT_SERVER_LOGGING_LEVEL="WARNING",
             PREFECT_SERVER_API_AUTH_STRING=f"{users['prefect']}:{fake['prefect_password']}",
             PREFECT_API_AUTH_STRING=f"{users['prefect']}:{fake['prefect_password']}")
    pe.pop("PREFECT_API_URL", None)
    prefect_proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pport)],
        cwd=pdir, env=pe, stdout=open(pdir / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    gateway = _Gateway(mport, f"{users['mlflow']}:{fake['mlflow_password']}")
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    try:
        _wait_http(f"http://127.0.0.1:{mport}/health", mlflow_proc, mdir / "server.log")
        _wait_http(f"http://127.0.0.1:{pport}/api/health", prefect_proc, pdir / "server.log")
        gport = gateway.server_address[1]
        r = rectflow(
            "run", "--verbose", cwd=tiny_ws, timeout=900, PREFECT_HOME=str(chome),
            MLFLOW_TRACKING_URI=f"http://{users['mlflow']}:{fake['mlflow_password']}@127.0.0.1:{gport}",
            PREFECT_API_URL=f"http://{users['prefect']}:{fake['prefect_password']}@127.0.0.1:{pport}/api",
            **aws_env(fake))
        assert r.returncode == 0, r.stderr[-4000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert "does not answer" not in r.stderr, r.stderr[-2000:]
        # MLflow: every request but the anonymous health probe came with the credentials
        assert gateway.authorized > 20 and gateway.refused <= 1, (gateway.authorized, gateway.refused)
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{mdir / 'mlflow.db'}")
        parent = client.get_run(result["mlflow_parent_run_id"])
        assert parent.data.params["tracking.mlflow_uri"] == "sqlite:///mlflow.db"
        # Prefect: the run is on the authenticated server (an anonymous request is refused)
        req = urllib.request.Request(f"http://127.0.0.1:{pport}/api/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(req, timeout=10)
        token = base64.b64encode(f"{users['prefect']}:{fake['prefect_password']}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            runs = json.loads(resp.read())
        assert any(fr["flow_id"] and fr["state_type"] == "COMPLETED" for fr in runs), runs
        _stop(mlflow_proc)
        _stop(prefect_proc)
        n = needles(fake, users)
        hits = []
        for root in (tiny_ws, chome, mdir, pdir):
            hits += grep_tree(root, n)
        hits += [f"output: {x.decode()}" for x in n if x.decode() in r.stdout + r.stderr]
        assert not hits, hits
    finally:
        gateway.shutdown()
        for proc in (mlflow_proc, prefect_proc):
            if proc.poll() is None:
                _stop(proc)
