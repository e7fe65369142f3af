"""A real S3-compatible object store on loopback: OpenStack Swift with its ``s3api`` middleware.

Test support, not part of the shipped package. The project's tests (and anyone who wants to try
the pipeline against S3 on one machine, from a checkout) start it with :class:`SwiftS3Server`::

    with SwiftS3Server() as s3:
        s3.create_bucket("rectflow")
        subprocess.run(cmd, env={**os.environ, **s3.env()}, check=True, timeout=60)

It runs memcached and Swift's account, container, object and proxy servers as subprocesses, each in
its own process group, bound to free loopback ports; configuration, rings, data and logs live in
one directory. :meth:`SwiftS3Server.stop` ends every process it started. The servers also receive
SIGTERM if the Python thread that started them dies (Linux ``PR_SET_PDEATHSIG``), so a killed test
run leaves nothing behind.

From a shell, in the repository root: ``python -m tests.support.swift [--dir DIR] [--port PORT]``
prints the environment to export and serves until Ctrl-C.

Needs Debian's packages :data:`SWIFT_PACKAGES` (``scripts/install-test-services.sh`` installs
them). Without them :meth:`SwiftS3Server.start` raises :class:`RuntimeError` naming the packages;
it never skips: callers decide what a missing server means.

One file of about 550 lines on purpose: it is one server harness (configuration, rings, process
lifecycle, readiness, client helpers and its command line), and its parts are used only together.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: Debian packages that provide the binaries this module runs.
SWIFT_PACKAGES: tuple[str, ...] = (
    "swift", "swift-proxy", "swift-account", "swift-container", "swift-object", "memcached",
)

# binary -> Debian package that ships it
_BINARIES: dict[str, str] = {
    "memcached": "memcached",
    "swift-ring-builder": "swift",
    "swift-account-server": "swift-account",
    "swift-container-server": "swift-container",
    "swift-object-server": "swift-object",
    "swift-proxy-server": "swift-proxy",
}
_BACKENDS: tuple[str, ...] = ("account", "container", "object")
_STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1

# Runs under Swift's own interpreter: one process builds all three rings (the swift-ring-builder
# command line would take nine processes, several seconds).
_RING_SCRIPT = """
import sys
from swift.common.ring import RingBuilder
etc = sys.argv[1]
for spec in sys.argv[2:]:
    kind, port = spec.split(":")
    builder = RingBuilder(6, 1, 1)
    builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port),
                     "device": "sdb1", "weight": 100.0, "meta": ""})
    builder.rebalance()
    builder.get_ring().save(f"{etc}/{kind}.ring.gz")
"""

_PROXY_PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth "
    "copy slo dlo proxy-logging proxy-server"
)


def find_binaries(search_path: str | None = None) -> dict[str, str]:
    """Absolute paths of the binaries the server needs, by name.

    Looks in ``search_path`` (``os.pathsep``-separated; default: ``$PATH`` plus ``/usr/bin``,
    ``/usr/sbin``, ``/usr/local/bin``, where Debian puts them even when ``$PATH`` is narrow).
    Raises :class:`RuntimeError` naming the missing binaries and the Debian packages to install.
    """
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin", "/usr/local/bin"])
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in _BINARIES:
        path = shutil.which(name, path=search_path)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        packages = sorted({_BINARIES[name] for name in missing})
        raise RuntimeError(
            f"Swift S3 test server: {', '.join(missing)} not found; install the Debian packages "
            f"{' '.join(packages)} (all needed: apt-get install -y --no-install-recommends "
            f"{' '.join(SWIFT_PACKAGES)}, or run scripts/install-test-services.sh as root)"
        )
    return found


def _interpreter_of(script: str) -> str:
    """The interpreter named by ``script``'s ``#!`` line (Swift's Python), else ``/usr/bin/python3``."""
    try:
        with open(script, "rb") as f:
            first = f.readline(256).decode("utf-8", "replace")
    except OSError:
        first = ""
    if first.startswith("#!"):
        parts = first[2:].split()
        if parts and parts[0].endswith("/env") and len(parts) > 1:
            return shutil.which(parts[1]) or parts[1]
        if parts:
            return parts[0]
    return "/usr/bin/python3"


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback TCP ports that were free a moment ago (all held open while picking)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tcp_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _child_env() -> dict[str, str]:
    """Environment for Swift's system Python: nothing from a virtual environment leaks in."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"):
        env.pop(var, None)
    return env


def _death_signal_preexec() -> Any:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when its parent thread dies, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


class SwiftS3Server:
    """Swift + s3api on loopback, as a context manager.

    ``SwiftS3Server(directory=None, port=None)``: ``directory`` holds configuration, rings, data
    (``node/``) and logs (``log/``); None means a fresh temporary directory that :meth:`stop`
    removes (a given directory is kept, logs included). ``port`` is the S3 (proxy) port; None picks
    a free one. Credentials are Swift's tempauth test account, path-style addressing only.
    """

    access_key: str = "test:tester"
    secret_key: str = "testing"
    region: str = "us-east-1"

    def __init__(
        self,
        directory: str | Path | None = None,
        port: int | None = None,
        *,
        startup_timeout: float = 60.0,
    ) -> None:
        self._default_directory = Path(directory) if directory is not None else None
        self._default_port = port
        self.startup_timeout = float(startup_timeout)
        self.directory: Path | None = None
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._owns_directory = False
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, directory: str | Path | None = None, port: int | None = None) -> SwiftS3Server:
        """Write configuration and rings, start all processes, wait until S3 answers.

        Returns ``self``. Raises :class:`RuntimeError` (binaries missing, port taken, or not ready
        within ``startup_timeout`` seconds, with the tail of the servers' logs); on any failure
        every process already started is stopped first.
        """
        if self.running:
            raise RuntimeError(f"SwiftS3Server already running at {self.endpoint_url}")
        binaries = find_binaries()
        t0 = time.monotonic()
        directory = Path(directory) if directory is not None else self._default_directory
        port = port if port is not None else self._default_port
        if port is not None and not _port_is_free(port):
            raise RuntimeError(f"Swift S3 test server: port 127.0.0.1:{port} is already in use")
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="rectflow-swift-"))
            self._owns_directory = True
        else:
            self.directory = directory.resolve()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._owns_directory = False
        ports = free_ports(5)
        if port is not None:
            ports = [port, *[p for p in ports if p != port][:4]]
        self.port = ports[0]
        backend_ports = dict(zip(_BACKENDS, ports[1:4], strict=True))
        memcached_port = ports[4]
        atexit.register(self.stop)
        try:
            self._write_configs(backend_ports, memcached_port)
            self._build_rings(binaries["swift-ring-builder"], backend_ports)
            self._spawn(
                "memcached",
                [binaries["memcached"], "-l", "127.0.0.1", "-p", str(memcached_port), "-U", "0", "-m", "32", "-t", "1"]
                + (["-u", pwd.getpwuid(os.getuid()).pw_name] if os.geteuid() == 0 else []),
            )
            for kind in (*_BACKENDS, "proxy"):
                conf = self.directory / "etc" / f"{kind}-server.conf"
                self._spawn(kind, [binaries[f"swift-{kind}-server"], str(conf), "--verbose"])
            self._wait_ready(t0 + self.startup_timeout, [memcached_port, *backend_ports.values()])
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """SIGTERM every process group started here, SIGKILL after a grace period; idempotent.

        A temporary directory made by :meth:`start` is removed; a given one is kept.
        """
        procs = list(self._procs.items())
        self._procs.clear()
        for _name, proc in reversed(procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        for _name, proc in procs:
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_STOP_GRACE_S)
        atexit.unregister(self.stop)
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            self._owns_directory = False

    def __enter__(self) -> SwiftS3Server:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True while processes started by :meth:`start` are held (not necessarily all alive)."""
        return bool(self._procs)

    @property
    def pids(self) -> dict[str, int]:
        """Process ids by name (``memcached``, ``account``, ``container``, ``object``, ``proxy``)."""
        return {name: proc.pid for name, proc in self._procs.items()}

    @property
    def log_dir(self) -> Path:
        """Folder of one log file per process."""
        if self.directory is None:
            raise RuntimeError("SwiftS3Server is not started")
        return self.directory / "log"

    # -- what clients need -------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` (path-style S3)."""
        if self.port is None:
            raise RuntimeError("SwiftS3Server is not started")
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Variables that point AWS SDKs, DVC, MLflow and rectflow at this server.

        For subprocesses (``env={**os.environ, **server.env()}``) or ``monkeypatch.setenv``. It
        cannot unset anything: an ``AWS_PROFILE`` or ``AWS_SESSION_TOKEN`` already in the
        environment still applies.
        """
        url = self.endpoint_url
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": url,
            "AWS_ENDPOINT_URL_S3": url,
            # Swift 2.30's s3api rejects the aws-chunked uploads that newer SDKs use for
            # default checksums: send checksums only where the S3 API requires them.
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_EC2_METADATA_DISABLED": "true",
            "MLFLOW_S3_ENDPOINT_URL": url,
            "RECTFLOW_S3_ENDPOINT_URL": url,
            "RECTFLOW_S3_REGION": self.region,
            "RECTFLOW_S3_ADDRESSING_STYLE": "path",
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (keyword arguments go to ``botocore.config.Config``).

        Independent of the caller's AWS environment: explicit credentials, endpoint and region,
        and ``AWS_PROFILE`` ignored (a profile that is not there would otherwise break it).
        """
        import boto3
        import botocore.session
        from botocore.config import Config

        options: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "connect_timeout": 2,
            "read_timeout": 30,
            "retries": {"mode": "standard", "max_attempts": 3},
        }
        options.update(config)
        no_profile = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
        session = boto3.session.Session(botocore_session=no_profile)
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**options),
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if this account already owns it); return ``name``."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name

    def __repr__(self) -> str:
        where = self.endpoint_url if self.port is not None else "not started"
        return f"SwiftS3Server({where}, running={self.running})"

    # -- internals ---------------------------------------------------------------------------

    def _write_configs(self, backend_ports: dict[str, int], memcached_port: int) -> None:
        assert self.directory is not None
        etc, node, log = self.directory / "etc", self.directory / "node" / "sdb1", self.directory / "log"
        for folder in (etc, node, log):
            folder.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwuid(os.getuid()).pw_name
        (etc / "swift.conf").write_text(
            "[swift-hash]\n"
            "swift_hash_path_suffix = rectflow-test-suffix\n"
            "swift_hash_path_prefix = rectflow-test-prefix\n"
            "[storage-policy:0]\nname = Policy-0\ndefault = yes\n"
        )

        def common(name: str) -> str:
            return (
                f"user = {user}\nbind_ip = 127.0.0.1\nworkers = 0\nswift_dir = {etc}\n"
                f"log_level = WARNING\nlog_name = {name}\n"
            )

        for kind, port in backend_ports.items():
            (etc / f"{kind}-server.conf").write_text(
                "[DEFAULT]\n"
                + common(f"{kind}-server")
                + f"bind_port = {port}\ndevices = {self.directory / 'node'}\nmount_check = false\n"
                "disable_fallocate = true\n"
                f"[pipeline:main]\npipeline = {kind}-server\n"
                f"[app:{kind}-server]\nuse = egg:swift#{kind}\n"
            )
        (etc / "proxy-server.conf").write_text(
            "[DEFAULT]\n"
            + common("proxy-server")
            + f"bind_port = {self.port}\n"
            f"[pipeline:main]\npipeline = {_PROXY_PIPELINE}\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
            f"[filter:s3api]\nuse = egg:swift#s3api\nlocation = {self.region}\n"
            "[filter:tempauth]\nuse = egg:swift#tempauth\n"
            "user_admin_admin = admin .admin .reseller_admin\n"
            f"user_test_tester = {self.secret_key} .admin\n"
            f"[filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = 127.0.0.1:{memcached_port}\n"
            + "".join(
                f"[filter:{name}]\nuse = egg:swift#{name.replace('-', '_')}\n"
                for name in ("catch_errors", "gatekeeper", "healthcheck", "proxy-logging", "listing_formats",
                             "copy", "slo", "dlo")
            )
        )

    def _build_rings(self, ring_builder: str, backend_ports: dict[str, int]) -> None:
        assert self.directory is not None
        python = _interpreter_of(ring_builder)
        specs = [f"{kind}:{port}" for kind, port in backend_ports.items()]
        try:
            done = subprocess.run(
                [python, "-c", _RING_SCRIPT, str(self.directory / "etc"), *specs],
                env=_child_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError("Swift S3 test server: building the rings took over 60 s") from None
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise RuntimeError(f"Swift S3 test server: building the rings with {python} failed: {' | '.join(tail)}")

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.directory is not None
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self._procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=_child_env(),
                start_new_session=True,
                preexec_fn=_death_signal_preexec(),  # noqa: PLW1509 - only prctl, no locks
            )

    def _log_tail(self, lines: int = 5) -> str:
        out = []
        for name in self._procs:
            path = self.log_dir / f"{name}.log"
            try:
                text = path.read_text(errors="replace").strip().splitlines()
            except OSError:
                continue
            if text:
                out.append(f"[{name}] " + " | ".join(text[-lines:]))
        return "; ".join(out) if out else "(logs empty)"

    def _wait_ready(self, deadline: float, tcp_ports: list[int]) -> None:
        """Poll until memcached and the backends accept connections, the proxy's /healthcheck
        answers OK, and a signed S3 ListBuckets succeeds; fail fast if a process exits."""
        stage = "backend ports"
        client = None
        last = ""
        while True:
            for name, proc in self._procs.items():
                code = proc.poll()
                if code is not None:
                    raise RuntimeError(
                        f"Swift S3 test server: {name} exited with status {code} during start-up; "
                        f"{self._log_tail()}"
                    )
            try:
                if stage == "backend ports" and all(_tcp_open(p) for p in tcp_ports):
                    stage = "proxy /healthcheck"
                if stage == "proxy /healthcheck":
                    with urllib.request.urlopen(f"{self.endpoint_url}/healthcheck", timeout=2) as r:
                        if r.status == 200:
                            stage = "S3 ListBuckets"
                if stage == "S3 ListBuckets":
                    if client is None:
                        client = self.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
                    client.list_buckets()
                    return
            except (OSError, urllib.error.URLError) as e:
                last = f"{type(e).__name__}: {e}"
            except Exception as e:  # botocore errors while the proxy warms up
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                kept = "" if self._owns_directory else f" (kept in {self.log_dir})"
                raise RuntimeError(
                    f"Swift S3 test server at {self.endpoint_url} not ready within {self.startup_timeout:.0f} s "
                    f"(waiting for {stage}; last error: {last or 'none'}); logs{kept}: {self._log_tail()}"
                )
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.swift``: start a server, print its environment, serve until stopped."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.swift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="state directory (kept); default: a temporary one")
    parser.add_argument("--port", type=int, default=None, help="S3 port on 127.0.0.1; default: a free one")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--timeout", type=float, default=60.0, help="start-up timeout in seconds")
    args = parser.parse_args(argv)
    server = SwiftS3Server(args.dir, args.port, startup_timeout=args.timeout)
    try:
        server.start()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = False

    def _handle(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    try:
        for bucket in args.bucket:
            server.create_bucket(bucket)
        print(f"# Swift S3 ready in {server.startup_seconds:.1f} s; logs: {server.log_dir}", flush=True)
        for key, value in server.env().items():
            print(f"export {key}={shlex.quote(value)}", flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
