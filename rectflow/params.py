"""Parameters resolved once: built-in defaults < a profile < ``params.yaml`` < ``--set`` / the UI form.

A key takes the value of the last layer that *names* it, whatever that value is (the default
included): a layer's document is deep-merged over the one before, key by key inside sections, and a
list replaces a list. The layers:

1. the built-in defaults of :class:`rectflow.config.Params`;
2. a profile (``profile`` key: ``auto`` picks ``images`` for image targets and says so; ``none``; a
   name, ``rectflow/profiles/NAME.yaml``; or a path to a YAML file);
3. ``params.yaml`` (what the user wrote; ``rectflow run --set`` writes its overrides there too);
4. ``--set KEY=VALUE`` overrides (dotted keys, YAML values, like ``dvc exp run -S``).

:func:`resolve` returns the validated :class:`~rectflow.config.Params` and the document that the
stages read and MLflow, DVC and Prefect record (:func:`write_resolved`: ``params.resolved.yaml``).
Every YAML file goes through one reader, :func:`read_yaml`: YAML 1.2 scalars (``1e-3`` is a float;
``yes``/``on`` are strings, never booleans), a duplicate key is an error naming it and its line.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rectflow.config import Params, ParamsError, dump_params, inception_missing, target_is_images, validate
from rectflow.io import require_file

__all__ = [
    "PROFILES_DIR", "RESOLVED_FILE", "Resolution", "apply_overrides", "load_params", "parse_override",
    "digest_params", "profile_path", "read_yaml", "render_resolved", "resolve", "write_resolved_params",
]

PROFILES_DIR = Path(__file__).with_name("profiles")
RESOLVED_FILE = "params.resolved.yaml"


# ---- one YAML reader ------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema booleans and floats, refusing duplicate keys."""


# YAML 1.1 (PyYAML's default) reads yes/no/on/off as booleans and 1e-3 as a string; YAML 1.2 does not.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _float(loader: yaml.SafeLoader, node: yaml.Node) -> float | int:
    text = loader.construct_scalar(node)  # type: ignore[arg-type]
    low = str(text).lower()
    if low.lstrip("+-") == ".inf":
        return -math.inf if low.startswith("-") else math.inf
    if low == ".nan":
        return math.nan
    if re.fullmatch(r"[-+]?[0-9]+", str(text)):  # the int resolver takes these first; never reached
        return int(text)
    return float(text)


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_Loader.add_constructor("tag:yaml.org,2002:float", _float)
_Loader.add_constructor("tag:yaml.org,2002:map", _mapping)


def load_yaml_text(text: str, where: str) -> Any:
    """Parse YAML ``text`` with the one reader; ParamsError naming ``where`` (and the line) if it fails."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:
        raise ParamsError(f"{where}: a value is nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or ""
        if problem.startswith("duplicate key"):
            raise ParamsError(f"{where}: {problem}{at}") from None
        raise ParamsError(f"{where}: not valid YAML{at}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A params-like YAML file as a dict (empty file: ``{}``); ParamsError with one line naming it."""
    p = Path(path)
    require_file(p, ParamsError, f"{p}: params file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ParamsError(f"{p}: not UTF-8 text") from None
    except OSError as e:
        raise ParamsError(f"{p}: cannot be read ({e.strerror or e.__class__.__name__})") from None
    doc = load_yaml_text(text, str(p))
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ParamsError(f"{p}: expected a mapping of sections, got {type(doc).__name__}")
    return doc


# ---- overrides ------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"pretrain.steps=500"`` -> (["pretrain", "steps"], 500); the value is read as YAML 1.2."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"--set {item!r}: expected KEY=VALUE with a dotted key")
    key = key.strip()
    value = load_yaml_text(raw, f"--set {key}") if raw.strip() else None
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"--set {key}: value must be finite, got {raw!r}")
    return key.split("."), value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``doc`` with each ``KEY=VALUE`` applied (dotted keys, nested dicts)."""
    out = copy.deepcopy(doc)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ParamsError(f"--set {item.partition('=')[0]}: {'.'.join(path[: i + 1])} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---- profiles -------------------------------------------------------------------------------------


def profile_path(name: str) -> Path:
    """The file of profile ``name``: ``rectflow/profiles/NAME.yaml``, or ``name`` itself if it is a path."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return Path(name).expanduser()
    return PROFILES_DIR / f"{name}.yaml"


def available_profiles() -> list[str]:
    return sorted(f.stem for f in PROFILES_DIR.glob("*.yaml"))


def _choose_profile(user: Params) -> tuple[str | None, str]:
    """(profile name or None, why): ``auto`` picks ``images`` for (c, h, w) targets."""
    name = user.profile
    if name == "auto":
        if target_is_images(user.data):
            return "images", "auto: the target is image data"
        return None, "auto: the target is vectors"
    if name == "none":
        return None, "profile: none"
    return name, f"profile: {name}"


def _read_profile(name: str) -> tuple[dict[str, Any], Path]:
    path = profile_path(name)
    known = ", ".join(["auto", "none", *available_profiles()])
    require_file(path, ParamsError, f"profile: {name!r} not found ({path}); expected one of {known} or a .yaml path")
    doc = read_yaml(path)
    for key in ("profile", "data"):  # the profile is chosen from these: it cannot change them
        if key in doc:
            raise ParamsError(f"{path}: {key}: a profile cannot set it (the profile is chosen from it)")
    validate(doc, f"profile {name} ({path})")  # a bad key in a profile names the profile file
    return doc, path


# ---- resolution -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolution:
    """The outcome of :func:`resolve`: the params the stages use and where they came from."""

    params: Params
    profile: str | None
    why: str
    files: tuple[Path, ...] = field(default_factory=tuple)
    """The files that were read, in layer order (profile, then params.yaml)."""

    def note(self) -> str:
        """One line for the log: which profile applied and why."""
        if self.profile is None:
            return f"params: no profile ({self.why})"
        return f"params: profile {self.profile} ({self.why}; {profile_path(self.profile)})"


_MOVED = {"images": "the images budget is the profile rectflow/profiles/images.yaml now (chosen with `profile`, "
                    "auto for image targets); set the stage keys themselves to change it"}


def resolve(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Resolution:
    """Resolve ``path`` (+ ``overrides``) over its profile and the built-in defaults; validate once.

    Raises :class:`ParamsError` (one line naming the key and the file) for any bad input: an unknown
    key, a wrong type, a duplicate key, a profile that does not exist or is itself invalid, a check
    across sections that fails only with the profile applied, an ``evaluate.inception`` file that is
    not there.
    """
    source = str(path)
    user_doc = apply_overrides(read_yaml(path), overrides or [])
    for key, why in _MOVED.items():
        if key in user_doc:
            raise ParamsError(f"{source}: {key}: {why}")
    user = validate(user_doc, source)  # the user's own keys are checked alone first: errors name them
    name, why = _choose_profile(user)
    files: list[Path] = []
    merged = user_doc
    if name is not None:
        prof_doc, prof_file = _read_profile(name)
        files.append(prof_file)
        merged = deep_merge(prof_doc, user_doc)
    files.append(Path(path))
    try:
        params = validate(merged, source)
    except ParamsError as e:
        raise ParamsError(f"{e} (with the {name} profile applied)") from None
    det = params.evaluate.inception
    if det:  # before any stage runs, not after training
        require_file(Path(det).expanduser(), ParamsError, inception_missing(det))
    return Resolution(params, name, why, tuple(files))


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """The resolved params of ``path`` with ``overrides``: :func:`resolve` without the provenance."""
    return resolve(path, overrides).params


def digest_params(p: Params) -> str:
    """sha256 of the resolved document: equal exactly when the stages would see the same params."""
    return hashlib.sha256(json.dumps(dump_params(p), sort_keys=True).encode()).hexdigest()


def render_resolved(p: Params) -> str:
    """The text of ``params.resolved.yaml``: a header naming the layers, then the whole document."""
    name, why = _choose_profile(p)  # profiles never set data or profile: the same choice as resolve()
    layers = ["built-in defaults (rectflow/config.py)"]
    if name is not None:
        layers.append(f"profile {name} ({why})")
    layers.append("params.yaml and --set")
    head = ("# Generated by rectflow (rectflow/params.py); do not edit: edit params.yaml.\n"
            f"# The params every stage runs with: {' < '.join(layers)}.\n")
    return head + yaml.safe_dump(dump_params(p), sort_keys=False, allow_unicode=True, width=100)


def write_resolved_params(p: Params, root: str | Path = ".") -> Path:
    """Write ``params.resolved.yaml`` in ``root`` (atomically; untouched when the content is equal)."""
    from rectflow.io import atomic_write_bytes

    out = Path(root) / RESOLVED_FILE
    text = render_resolved(p).encode()
    if not (out.is_file() and out.read_bytes() == text):
        atomic_write_bytes(out, text)
    return out


def reference_markdown() -> str:
    """``docs/params.md``: every key of the schema with its built-in default and description."""
    from pydantic import BaseModel

    rows: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key, default = f"{prefix}{name}", f.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                walk(type(default), f"{key}.")
                continue
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [d.model_dump(mode="json", exclude_defaults=True) for d in default]
            desc = " ".join((f.description or "").split()).replace("|", "\\|")
            rows.append(f"| `{key}` | `{default!r}` | {desc} |")

    walk(Params, "")
    return ("# Every params key\n\n"
            "Each key with its built-in default (`rectflow/config.py`) and meaning. `params.yaml` holds only the\n"
            "keys you set; `rectflow params` prints the resolved document (defaults < profile < params.yaml <\n"
            "`--set`), `rectflow params --defaults` the defaults alone. The images profile\n"
            "(`rectflow/profiles/images.yaml`) replaces some of these defaults for image targets.\n"
            "Generated by `rectflow.params.reference_markdown()`; `tests/test_docs.py` fails when it drifts.\n\n"
            "| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n")
