"""Specs: every field takes only values of its type and range; a wrong one is refused naming the field.

Hypothesis draws values of the wrong type for every field of every spec dataclass (strings for
tuples, truthy strings and integers for booleans, floats for integers, ...), and junk dicts for
QuantSpec.from_dict; a value is either accepted as what it says or refused with a ValueError that
names the field. Nothing is silently reinterpreted.
"""

import dataclasses
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dqcompile
from dqcompile import ActivationSpec, GPTQOptions, PTQ4DiTOptions, QuantSpec, TQDiTOptions, WeightSpec
from tiny_models import tiny_dit

SPEC_CLASSES = (WeightSpec, ActivationSpec, GPTQOptions, PTQ4DiTOptions, TQDiTOptions)
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True), st.text(max_size=6),
    st.sampled_from(["yes", "no", "false", "true", "0", "1", "*emb*", "static_tensor"]),
    st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _field_type(cls: type, name: str) -> object:
    return typing.get_type_hints(cls)[name]


@pytest.mark.parametrize("cls", SPEC_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_field_value_is_taken_as_typed_or_refused_naming_the_field(cls, data):
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    value = data.draw(JUNK)
    try:
        built = cls(**{field: value})
    except ValueError as error:
        assert field in str(error)
        return
    kept = getattr(built, field)
    annotation = _field_type(cls, field)
    # Accepted: the value is of the field's type exactly (a bool is not an int, a str not a bool).
    if annotation is bool:
        assert type(kept) is bool and kept is value
    elif annotation is int:
        assert type(kept) is int and kept == value
    elif annotation is float:
        assert type(kept) in (int, float) and kept == value
    elif annotation is str:
        assert type(kept) is str and kept == value


@pytest.mark.parametrize("field,value", [
    ("keep_float", "*emb*"), ("keep_float", ["*emb*", 3]), ("group_sizes", "*q"), ("group_sizes", (("*q", "16"),)),
    ("fit_group_sizes", "no"), ("method", "RTN"), ("name", 7), ("options", {"ssc": False}),
])
def test_quant_spec_fields_of_the_wrong_kind_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**{field: value})


def test_a_string_keep_float_is_not_split_into_characters():
    with pytest.raises(ValueError, match=r"keep_float must be a tuple of \(pattern, str\) pairs, got '\*emb\*'"):
        QuantSpec(keep_float="*emb*")
    # A tuple of bare patterns is what the user meant: each pattern keeps its layers float.
    spec = QuantSpec(keep_float=("*emb*", "proj_out"))
    assert [pattern for pattern, _ in spec.keep_float] == ["*emb*", "proj_out"]
    qmodel = dqcompile.quantize(tiny_dit(), spec, progress=False)
    quantized = {row.name for row in qmodel.report.layers if row.weights != "float"}
    assert "transformer_blocks.0.attn1.to_q" in quantized and "transformer_blocks.0.norm1.linear" in quantized
    assert not any("emb" in name for name in quantized)


@pytest.mark.parametrize("option,value", [
    ("clip_search", "no"), ("clip_search", 1), ("clip_unit_gain", "true"), ("symmetric", "yes"), ("ssc", "false"), ("hessian", "false"),
    ("mrq", 0), ("act_order", "True"),
])
def test_boolean_options_take_booleans_only(option, value):
    owner = next(cls for cls in SPEC_CLASSES if option in {f.name for f in dataclasses.fields(cls)})
    with pytest.raises(ValueError, match=rf"{option}={value!r} is not allowed: expected bool, got {type(value).__name__}"):
        owner(**{option: value})


@settings(max_examples=80, deadline=None)
@given(junk=st.dictionaries(st.sampled_from(["weights", "activations", "method", "options", "keep_float", "name",
                                             "bits", "group_sizes", "x"]), JUNK, max_size=4))
def test_from_dict_refuses_junk_with_a_value_error(junk):
    try:
        spec = QuantSpec.from_dict(junk)
    except ValueError:
        return
    assert isinstance(spec, QuantSpec)  # what was accepted is a complete, validated spec


def test_from_dict_messages_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown spec field\(s\) bits"):
        QuantSpec.from_dict({"bits": 8})
    with pytest.raises(ValueError, match=r"unknown field\(s\) weights\.bitz"):
        QuantSpec.from_dict({"weights": {"bitz": 8}})
    with pytest.raises(ValueError, match=r"weights must be a mapping of WeightSpec fields, got 8"):
        QuantSpec.from_dict({"weights": 8})
    with pytest.raises(ValueError, match=r"a spec dict must be a mapping, got list"):
        QuantSpec.from_dict([1, 2])
    assert QuantSpec.from_dict({}) == QuantSpec()
