"""Property: whatever params document or ``--set`` override a user writes, the params loader either
loads it or raises :class:`ParamsError` (one line naming the culprit), never a traceback from deeper
code (pydantic, PyYAML, dict handling)."""

from __future__ import annotations

import math
import string
from pathlib import Path


import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rectflow.config import Params, ParamsError, dump_params, validate
from rectflow.params import apply_overrides, load_params

SECTIONS = {name: sorted(field.annotation.model_fields) for name, field in Params.model_fields.items()
            if hasattr(field.annotation, "model_fields")}
KNOWN_KEYS = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys] + ["seed"]

# Scalars of every type a YAML document can hold, with the nasty ones (NaN, inf, huge ints, '',
# None, negative and zero numbers) well represented.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, 0.0, -0.5, 1e30, float("nan"), float("inf")]),
    st.text(max_size=12), st.sampled_from(["euler", "rk45", "rk99", "moons", "file", "auto", "fp32", "bf16", ""]),
)
str_keys = st.one_of(st.sampled_from(sorted(SECTIONS) + ["seed", "pretrian", "stpes"]),
                     st.sampled_from([k.split(".")[1] for k in KNOWN_KEYS if "." in k]),
                     st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=8))
keys = st.one_of(str_keys, st.integers(-2, 2), st.none(), st.booleans())  # YAML keys need not be strings
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(keys, inner, max_size=3)), max_leaves=12)
# A document: mostly the real sections with some real keys, plus anything else.
section_docs = st.dictionaries(
    st.sampled_from(sorted(SECTIONS)),
    st.one_of(st.dictionaries(st.sampled_from(sum(SECTIONS.values(), [])), values, max_size=4), values),
    max_size=4,
)
documents = st.one_of(section_docs, st.dictionaries(keys, values, max_size=4), values)

override_keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.builds(lambda a, b: f"{a}.{b}", str_keys, str_keys),
                          st.text(alphabet=string.ascii_lowercase + "._= ", max_size=15))
override_values = st.one_of(
    st.sampled_from(["0", "-1", "1e30", "nan", ".inf", "-.inf", "abc", "[1, 2]", "{a: 1}", "null", "", "yes",
                     "[", "{", "'", "!!python/object:os.system", "&a [*a]", "2024-01-01", "0x10", "1_000"]),
    st.text(max_size=15),
)
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values),
                               st.text(max_size=20)), max_size=4)


def _loads_or_clear_error(call) -> None:
    try:
        out = call()
    except ParamsError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"ParamsError must be one line, got {msg!r}"
        return
    assert isinstance(out, (Params, dict))
    if isinstance(out, Params):
        dump_params(out)  # a loaded document is usable


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents)
def test_validate_loads_or_raises_params_error(doc):
    _loads_or_clear_error(lambda: validate(doc, "params.yaml"))


@settings(max_examples=300, deadline=None, database=None)
@given(doc=section_docs, items=overrides)
def test_overrides_then_validate_load_or_raise_params_error(doc, items):
    def call():
        return validate(apply_overrides(doc, items), "params.yaml")

    _loads_or_clear_error(call)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents, items=overrides)
def test_load_params_from_a_file(tmp_path_factory, doc, items):
    """The real entry point: a YAML file on disk plus ``--set`` overrides."""
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    try:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    except (yaml.YAMLError, UnicodeEncodeError):
        assume(False)
    _loads_or_clear_error(lambda: load_params(path, items))


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
                     st.sampled_from(["pretrain:\n  steps: [", "\t- a", "a: b: c", "- 1\n- 2", "{", "seed: .nan",
                                      "*a", "!!binary x", "pretrain: 5", "%YAML 9.9\n---\n"])))
def test_any_text_as_params_file(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(raw, encoding="utf-8", errors="surrogatepass") if not any(0xD800 <= ord(c) <= 0xDFFF for c in raw) else assume(False)
    _loads_or_clear_error(lambda: load_params(path, []))


def test_known_good_document_loads():
    p = load_params(REPO_PARAMS, ["pretrain.steps=7", "couple.solver=heun"])
    assert p.pretrain.steps == 7 and p.couple.solver == "heun" and not math.isnan(p.pretrain.lr)


REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

# Files that are not UTF-8, deep nesting and keys with line breaks: one-line ParamsError, no traceback.


def test_params_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"\xff\xfe\x00pretrain: 1")
    _loads_or_clear_error(lambda: load_params(path, []))


def test_params_file_nested_too_deeply(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: " + "[" * 5000 + "]" * 5000)
    _loads_or_clear_error(lambda: load_params(path, []))


def test_key_with_a_line_break_gives_a_one_line_error():
    _loads_or_clear_error(lambda: validate({"pretrain": {"ste\nps": 1}}, "params.yaml"))


def test_override_nested_too_deeply():
    _loads_or_clear_error(lambda: validate(apply_overrides({}, ["seed=" + "[" * 5000 + "]" * 5000])))
