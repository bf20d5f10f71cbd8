"""The request schema: every bound gives a typed error naming the field (no services needed)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.errors import InvalidRequest
from scheduler.schema import GenerationRequest, parse_request, request_json_schema

BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 10_000}, "prompt"),
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 10_000}, "steps"),
    ({"prompt": "a", "width": 65, "height": 64}, "width"),
    ({"prompt": "a", "width": 64}, "(request)"),
    ({"prompt": "a", "width": 4096, "height": 4096}, "width"),
    ({"prompt": "a", "scheduler": "plms-ish"}, "scheduler"),
    ({"prompt": "a", "model": "../etc/passwd"}, "model"),
    ({"prompt": "a", "guidance_scale": float("nan")}, "guidance_scale"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "tenant": ""}, "tenant"),
    ({"prompt": "a", "priority": 10}, "priority"),
    ({"prompt": "a", "colour": "red"}, "colour"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a\x00b"}, "prompt"),
]


@pytest.mark.parametrize("payload,field", BAD)
def test_bad_requests_name_the_field(payload, field):
    with pytest.raises(InvalidRequest) as info:
        parse_request(payload)
    fields = [d["field"] for d in info.value.details]
    assert any(f.startswith(field) for f in fields), fields
    assert str(info.value).startswith("invalid request")


def test_not_an_object_is_a_typed_error():
    for payload in ([1, 2], 3, None, "not json"):
        with pytest.raises(InvalidRequest):
            parse_request(payload)


def test_defaults_and_round_trip():
    req = parse_request({"prompt": "a cute puppy playing in a garden"})
    assert req.seed is None and req.steps is None and req.scheduler is None and req.tenant == "public"
    assert req.model is None  # the cluster's default (REPRISE_DEFAULT_MODEL) is chosen when it is routed
    again = parse_request(req.model_dump_json())
    assert again == req


def test_schema_is_versioned_and_valid_json_schema():
    import jsonschema

    schema = request_json_schema()
    assert schema["version"] == "1.0"
    jsonschema.Draft202012Validator.check_schema(schema["request"])
    validator = jsonschema.Draft202012Validator(schema["request"])
    assert not list(validator.iter_errors({"prompt": "a"}))
    assert list(validator.iter_errors({"prompt": "a", "steps": 0}))
    json.dumps(schema)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(list(GenerationRequest.model_fields) + ["junk"]),
        st.one_of(
            st.none(),
            st.integers(),
            st.floats(allow_nan=True),
            st.text(max_size=50),
            st.booleans(),
            st.lists(st.integers(), max_size=3),
        ),
    )
)
def test_random_payloads_are_accepted_or_typed_errors(payload):
    try:
        req = parse_request(payload)
    except InvalidRequest as exc:
        assert exc.details
        return
    assert isinstance(req, GenerationRequest)
