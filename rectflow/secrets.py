"""Secrets are never shown nor stored: the one place that finds them and blanks them.

A secret is either part of a URL (its userinfo, ``scheme://USER:PASSWORD@host``, or the value of a
query parameter whose name looks secret, ``?token=…``, ``X-Amz-Signature=…``) or the value of an
environment variable whose name looks secret (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``MLFLOW_TRACKING_PASSWORD``, ``PREFECT_API_AUTH_STRING``, ``PREFECT_API_KEY`` …). Three rules:

1. **Params never hold one.** ``params.yaml``, ``params.resolved.yaml``, ``dvc.lock``, MLflow params and
   Prefect's parameters all record params, so :func:`url_problem` is checked on every string value of
   the schema (:mod:`rectflow.config`): a URL with credentials is refused with one line naming the key
   and where its client takes credentials from (:func:`credential_hint`).
2. **The environment may hold them, in the client's own variables.** :func:`split_environment`
   (run by every ``rectflow`` command before anything else, and by the tracker) moves the userinfo of
   ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` into ``MLFLOW_TRACKING_USERNAME`` /
   ``MLFLOW_TRACKING_PASSWORD`` and that of ``PREFECT_API_URL`` into ``PREFECT_API_AUTH_STRING``, so the
   process (and every child: DVC, the stages) only ever holds the bare URL, which is what is used,
   shown and logged. A URL-valued variable whose client takes no credentials in its URL (the Dask
   address, the S3 endpoints, any ``RECTFLOW_*``) is refused with one line.
3. **Every sink blanks what is left.** :func:`redact_text` replaces URL credentials by ``***`` and
   the value of every secret-looking environment variable (and every password found in a URL-valued
   variable) by ``***``. :func:`install` applies it to everything the process prints (stdout and
   stderr: messages, warnings, tracebacks, DVC's lines, Prefect's console) and to every log record
   (what Prefect sends to its database); MLflow params and tags, the Prefect artifact and the
   printed JSON line go through it explicitly.

Only the standard library: this is core, imported before anything heavy.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from typing import Any
from urllib.parse import unquote

__all__ = [
    "MASK", "SplitError", "credential_hint", "environment_problems", "install", "redact_arg",
    "redact_text", "redact_url", "secret_env_name", "secret_values", "split_environment", "url_problem",
]

MASK = "***"

# a URL anywhere in a text: scheme://, then anything up to whitespace or a quote/bracket
_URL = re.compile(r"""(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'"<>`]*)""")
# a query (or KEY=VALUE) name that looks secret, by its components (x-amz-signature, access_token, api_key…)
_SECRET_NAME = re.compile(
    r"(?:^|[_.\-])(?:secret|password|passwd|pwd|token|credentials?|signature|sig|key|apikey|auth)(?:$|[_.\-])",
    re.IGNORECASE)
# an environment variable name that looks secret, by its components (never PWD, the working directory)
_SECRET_ENV_WORDS = {"SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "CREDENTIALS", "PASSPHRASE"}
_SECRET_ENV_PAIRS = {("ACCESS", "KEY"), ("API", "KEY"), ("AUTH", "STRING"), ("PRIVATE", "KEY"), ("SECRET", "KEY")}
_MIN_SECRET = 6  # shorter environment values (true, 1, en_US) are never blanked out of every line

# URL-valued variables whose credentials move into the client's own variables
_SPLIT = {
    "MLFLOW_TRACKING_URI": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    "MLFLOW_REGISTRY_URI": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    "PREFECT_API_URL": ("PREFECT_API_AUTH_STRING", None),
}
_S3_HINT = "S3 takes them from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
_DASK_HINT = "Dask takes none in its address (secure the scheduler with TLS, distributed's security settings)"


class SplitError(ValueError):
    """A URL-valued environment variable holds credentials its client cannot take from it."""


# ---- finding secrets ------------------------------------------------------------------------------


def _authority_end(rest: str) -> int:
    """Index in ``rest`` (a URL after ``scheme://``) where the authority ends."""
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    return min(ends) if ends else len(rest)


def _split_url(url: str) -> tuple[str, str | None, str]:
    """(``scheme://``, userinfo or None, the rest after ``@``) of ``url``; ("", None, url) if not a URL."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*://)(.*)\Z", url, re.DOTALL)
    if not m:
        return "", None, url
    scheme, rest = m.groups()
    auth = rest[: _authority_end(rest)]
    at = auth.rfind("@")
    if at < 0:
        return scheme, None, rest
    return scheme, rest[:at], rest[at + 1:]


def _secret_query(url: str) -> list[tuple[str, str]]:
    """(name, value) of each query parameter of ``url`` whose name looks secret."""
    q = url.find("?")
    if q < 0:
        return []
    out = []
    for part in re.split(r"[&;]", url[q + 1:].split("#", 1)[0]):
        name, sep, value = part.partition("=")
        if sep and value and _SECRET_NAME.search(unquote(name)):
            out.append((unquote(name), value))
    return out


def url_problem(text: str) -> str | None:
    """What secret ``text`` holds in a URL (``'credentials (user:password@)'``, ``'a secret query
    parameter (token=…)'``), or None. The secret itself is never part of the answer."""
    for m in _URL.finditer(text):
        url = m.group(0)
        if _split_url(url)[1] is not None:
            return "credentials (user:password@)"
        names = _secret_query(url)
        if names:
            return f"a secret query parameter ({names[0][0][:40]}=…)"
    return None


def secret_env_name(name: str) -> bool:
    """Whether an environment variable's name says its value is a secret (by its ``_`` components)."""
    words = name.upper().split("_")
    return bool(_SECRET_ENV_WORDS & set(words)) or any(p in _SECRET_ENV_PAIRS for p in zip(words, words[1:]))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The secrets of the environment, longest first: values of secret-looking variables, the
    password (and ``user:password``) of ``PREFECT_API_AUTH_STRING``, and the credentials inside any
    URL-valued variable (a proxy, a database URL)."""
    env = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in env.items():
        if not value:
            continue
        if secret_env_name(name):
            found.add(value)
            if name.upper().endswith("AUTH_STRING") and ":" in value:
                found.add(value.split(":", 1)[1])
        if "://" in value:
            for m in _URL.finditer(value):
                _, userinfo, _ = _split_url(m.group(0))
                if userinfo:
                    found.add(userinfo)
                    found.add(unquote(userinfo))
                    user, _, password = userinfo.partition(":")
                    found.update({password, unquote(password)} - {""})
                found.update(v for _, v in _secret_query(m.group(0)))
    return sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True)


# ---- blanking them --------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with its userinfo as ``***@`` and its secret query values as ``***``
    (``http://***@host:5000/path?token=***``); anything that is not a URL unchanged."""
    scheme, userinfo, rest = _split_url(url)
    if not scheme:
        return url
    out = f"{scheme}{MASK}@{rest}" if userinfo is not None else f"{scheme}{rest}"
    if "?" in out:
        head, _, tail = out.partition("?")
        query, hash_, frag = tail.partition("#")
        parts = []
        for part in re.split(r"([&;])", query):
            name, sep, value = part.partition("=")
            parts.append(f"{name}={MASK}" if sep and value and _SECRET_NAME.search(unquote(name)) else part)
        out = f"{head}?{''.join(parts)}{hash_}{frag}"
    return out


def redact_text(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with every URL's credentials (:func:`redact_url`) and every secret of the environment
    (:func:`secret_values`) replaced by ``***``."""
    if not text:
        return text
    if "://" in text:
        text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    for value in secret_values(environ):
        if value in text:
            text = text.replace(value, MASK)
    return text


_SECRET_ARG = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|auth)", re.IGNORECASE)


def redact_arg(arg: str) -> str:
    """A command-line argument with anything that could be a secret blanked: URL credentials, the
    value of ``KEY=VALUE`` whose key looks secret, and the environment's secrets."""
    key, sep, _ = arg.partition("=")
    if sep and _SECRET_ARG.search(key):
        return f"{key}={MASK}"
    return redact_text(arg)


# ---- params: refused ------------------------------------------------------------------------------


def credential_hint(key: str) -> str:
    """Where the client of params key ``key`` takes its credentials from."""
    if key.startswith("tracking."):
        return ("give them to MLflow in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN), or the whole URI in MLFLOW_TRACKING_URI")
    if key.startswith("storage."):
        return _S3_HINT
    if key.startswith("couple.dask"):
        return _DASK_HINT
    return "give them to the client that needs them through its own environment variables"


# ---- the environment: split or refused ------------------------------------------------------------


def _refusal(name: str) -> str | None:
    """Why variable ``name`` may not hold URL credentials (None: not one of ours)."""
    up = name.upper()
    if up == "RECTFLOW_DASK_ADDRESS" or up.startswith("DASK_"):
        return _DASK_HINT
    if up.startswith(("AWS_ENDPOINT_URL", "RECTFLOW_S3_", "MLFLOW_S3_")):
        return _S3_HINT
    if up.startswith("RECTFLOW_"):
        return "give them to the client that needs them through its own environment variables"
    return None


def environment_problems(environ: dict[str, str] | None = None) -> list[str]:
    """One line per URL-valued variable that holds credentials its client cannot take from a URL."""
    env = os.environ if environ is None else environ
    out = []
    for name in sorted(env):
        value = env[name]
        if "://" not in value or name.upper() in _SPLIT:
            continue
        why = _refusal(name)
        problem = url_problem(value) if why else None
        if problem:
            out.append(f"{name}: must not contain {problem}; {why}")
    return out


def split_environment(environ: Any = None) -> list[str]:
    """Move URL credentials of the environment into the clients' own variables; return what moved.

    ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI``: ``http://USER:PASSWORD@host`` becomes
    ``http://host`` with ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (kept when already
    set); ``PREFECT_API_URL``: ``PREFECT_API_AUTH_STRING=USER:PASSWORD``. A secret query parameter in
    them, or URL credentials in a variable whose client takes none (:func:`environment_problems`),
    raises :class:`SplitError` with one line naming the variable, never the secret. Idempotent.
    """
    env = os.environ if environ is None else environ
    problems = environment_problems(env)
    moved = []
    for name, (user_var, password_var) in _SPLIT.items():
        value = env.get(name) or ""
        if "://" not in value:
            continue
        scheme, userinfo, rest = _split_url(value.strip())
        if userinfo is not None:
            user, colon, password = userinfo.partition(":")
            user, password = unquote(user), unquote(password)
            if password_var is None:  # Prefect: one USER:PASSWORD string
                env.setdefault(user_var, f"{user}:{password}" if colon else user)
            else:
                if user:
                    env.setdefault(user_var, user)
                if colon:
                    env.setdefault(password_var, password)
            env[name] = f"{scheme}{rest}"
            moved.append(name)
        if _secret_query(env[name]):
            hint = "MLFLOW_TRACKING_TOKEN" if name.startswith("MLFLOW") else "PREFECT_API_KEY"
            problems.append(f"{name}: must not contain {url_problem(env[name])}; give it in {hint}")
    if problems:
        raise SplitError(problems[0])
    return moved


# ---- sinks: every printed line and every log record -----------------------------------------------


class RedactingStream(io.TextIOBase):
    """A text stream that blanks secrets (:func:`redact_text`) in whole lines before passing them on."""

    def __init__(self, inner: Any) -> None:
        import threading

        self._inner = inner
        self._buf = ""
        self._lock = threading.RLock()  # a signal handler may print while a write holds it

    def write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            if "\n" in self._buf:
                head, _, self._buf = self._buf.rpartition("\n")
                self._inner.write(redact_text(head + "\n"))
        return len(s)

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                self._inner.write(redact_text(self._buf))
                self._buf = ""
        self._inner.flush()

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def isatty(self) -> bool:
        return self._inner.isatty()

    def fileno(self) -> int:
        return self._inner.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._inner, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._inner, "errors", None)

    def __getattr__(self, name: str) -> Any:  # buffer, reconfigure, mode … of the real stream
        return getattr(self._inner, name)


_installed = False


def _redacting_factory(factory: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logging's to report
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            import traceback

            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record

    make._rectflow_redacting = True  # type: ignore[attr-defined]
    return make


def install(streams: bool = True) -> None:
    """Blank secrets in every log record from now on and (``streams``) in everything printed on
    stdout and stderr. Idempotent; the ``rectflow`` command calls it first thing."""
    global _installed
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "_rectflow_redacting", False):
        logging.setLogRecordFactory(_redacting_factory(factory))
    if streams and not _installed:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, RedactingStream):
                setattr(sys, name, RedactingStream(stream))
        _installed = True
