"""Bad input: every rejection is a 4xx problem that names the field, and nothing is stored."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def assert_problem(response, status: int):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body)
    assert body["status"] == status
    return body


def post_raw(client, text: str | bytes, content_type: str = "application/json"):
    data = text.encode() if isinstance(text, str) else text
    return client.post("/v1/jobs", content=data, headers={"content-type": content_type})


BAD_SPECS = [
    pytest.param(
        {"name": "x", "dataset": "imagenet"},
        ["dataset"],
        ["mnist1d", "digits", "mnist5k", "synthetic"],
        id="unknown-dataset-lists-choices",
    ),
    pytest.param(
        {"name": "x", "search_space": {"lr": {"type": "float", "low": 2.0, "high": 1.0}}},
        ["search_space", "lr"],
        ["must not exceed"],
        id="low-above-high",
    ),
    pytest.param(
        {"name": "x", "search_space": {"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}},
        ["search_space", "lr"],
        ["low > 0"],
        id="log-range-from-zero",
    ),
    pytest.param(
        {"name": "x", "search_space": {"nesterov": {"type": "categorical", "choices": []}}},
        ["search_space", "nesterov", "choices"],
        ["at least 1"],
        id="empty-choices",
    ),
    pytest.param(
        {"name": "x", "search_space": {"warp_speed": 0.5}},
        ["search_space"],
        ["unknown knob 'warp_speed'", "langevin_steps"],
        id="unknown-knob-lists-valid-ones",
    ),
    pytest.param(
        {"name": "x", "dataset": "digits", "model": {"name": "cnn1d"}},
        ["model"],
        ["does not fit dataset 'digits'", "lenet"],
        id="model-dataset-mismatch",
    ),
    pytest.param({"name": "x", "colour": "blue"}, ["colour"], ["Extra inputs"], id="unknown-top-level-field"),
    pytest.param(
        {"name": "x", "budget": {"trials": 0}}, ["budget", "trials"], ["greater than"], id="no-trials"
    ),
    pytest.param(
        {"name": "x", "search_space": {"lr": {"type": "lognormal"}}},
        ["search_space", "lr"],
        ["float", "int", "categorical"],
        id="unknown-distribution-type",
    ),
    pytest.param({"dataset": "mnist1d"}, ["name"], ["Field required"], id="missing-name"),
    pytest.param([1, 2], ["body"], ["valid dictionary"], id="not-an-object"),
    pytest.param({"name": "x", "optimizer": []}, ["optimizer"], ["entropy_sgd"], id="optimizer-not-a-string"),
    pytest.param(
        {"name": "x", "baselines": ["rmsprop"]}, ["baselines", 0], ["sgd", "adam"], id="unknown-baseline"
    ),
    pytest.param(
        {"name": "x", "baselines": ["sgd", "sgd"]}, ["baselines"], ["distinct"], id="repeated-baseline"
    ),
    pytest.param(
        {
            "name": "x",
            "sampler": {"name": "grid"},
            "search_space": {"lr": {"type": "categorical", "choices": [0.1, 1.0]}},
            "baselines": ["adam"],
        },
        ["baselines"],
        ["grid cannot"],
        id="baseline-on-a-grid",
    ),
    pytest.param(
        {"name": "x", "dataset": "digits"},
        ["model"],
        ["does not fit dataset 'digits'"],
        id="default-model-does-not-fit-the-dataset",
    ),
    pytest.param(
        {"name": "x", "objectives": [{"metric": "val_accuracy"}, {"metric": "wall_time"}]},
        ["pruner"],
        ["single objective"],
        id="default-pruner-with-several-objectives",
    ),
]


@pytest.mark.parametrize(("body", "loc", "words"), BAD_SPECS)
def test_a_bad_spec_is_a_422_naming_the_field_and_stores_nothing(client, counts, body, loc, words):
    before = counts()
    problem = assert_problem(client.post("/v1/jobs", json=body), 422)
    assert problem["type"].endswith("validation-error")
    assert any(error["loc"] == loc for error in problem["errors"]), problem["errors"]
    messages = " ".join(error["msg"] for error in problem["errors"])
    for word in words:
        assert word in messages, messages
    assert counts() == before == (0, 0)


NON_FINITE = [
    pytest.param('{"name": "x", "search_space": {"lr": NaN}}', ["search_space", "lr"], id="fixed-knob-nan"),
    pytest.param(
        '{"name": "x", "search_space": {"lr": {"type": "float", "low": -Infinity, "high": 1}}}',
        ["search_space", "lr", "low"],
        id="range-low-minus-infinity",
    ),
    pytest.param(
        '{"name": "x", "search_space": {"momentum": {"type": "categorical", "choices": [0.5, NaN]}}}',
        ["search_space", "momentum", "choices", 1],
        id="inside-choices",
    ),
    pytest.param(
        '{"name": "x", "budget": {"wall_clock_limit_s": Infinity}}',
        ["budget", "wall_clock_limit_s"],
        id="budget",
    ),
    pytest.param(
        '{"name": "x", "resources": {"gpus": 1e999}}', ["resources", "gpus"], id="overflow-to-infinity"
    ),
    pytest.param('{"name": "x", "model": {"dropout": NaN}}', ["model", "dropout"], id="model"),
    pytest.param('{"name": "x", "pruner": {"percentile": -Infinity}}', ["pruner", "percentile"], id="pruner"),
    pytest.param('{"name": "x", "free_form": [NaN]}', ["free_form", 0], id="even-in-unknown-fields"),
]


@pytest.mark.parametrize(("text", "loc"), NON_FINITE)
def test_non_finite_numbers_in_the_json_text_are_rejected_where_they_are(client, counts, text, loc):
    problem = assert_problem(post_raw(client, text), 422)
    assert [error["loc"] for error in problem["errors"]] == [loc]
    assert "non-finite" in problem["errors"][0]["msg"]
    assert counts() == (0, 0)


def test_every_non_finite_number_is_listed(client):
    text = '{"name": "x", "budget": {"trials": NaN}, "seed": Infinity, "model": {"dropout": -Infinity}}'
    problem = assert_problem(post_raw(client, text), 422)
    assert sorted(map(tuple, (e["loc"] for e in problem["errors"]))) == [
        ("budget", "trials"),
        ("model", "dropout"),
        ("seed",),
    ]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "x",',
        "{'name': 'x'}",
        "",
        "nul",
        '{"name": "x"} trailing',
        "[" * 50_000,
        '{"a": 1' + "0" * 5000 + "}",
    ],
    ids=["truncated", "single-quotes", "empty-json", "bare-word", "trailing", "deep-nesting", "huge-integer"],
)
def test_malformed_json_is_a_400_problem(client, counts, text):
    if text == "":
        # An empty body is not malformed JSON but a missing one.
        assert_problem(post_raw(client, text), 422)
    else:
        problem = assert_problem(post_raw(client, text), 400)
        assert problem["type"].endswith("malformed-json")
    assert counts() == (0, 0)


def test_invalid_utf8_is_a_400_problem(client):
    assert_problem(post_raw(client, b'{"name": "\xff\xfe"}'), 400)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
def test_a_body_that_is_not_declared_json_is_a_415(client, counts, content_type):
    assert_problem(post_raw(client, json.dumps({"name": "x"}), content_type), 415)
    assert counts() == (0, 0)


def test_json_with_a_charset_or_a_json_suffix_type_is_accepted(client):
    assert post_raw(client, '{"name": "a"}', "application/json; charset=utf-8").status_code == 202
    assert post_raw(client, '{"name": "b"}', "application/merge-patch+json").status_code == 202


def test_a_body_over_the_limit_is_a_413_problem(client, counts):
    limit = client.app.state.settings.max_body_bytes
    big = json.dumps({"name": "x", "padding": "y" * limit})
    problem = assert_problem(post_raw(client, big), 413)
    assert str(limit) in problem["detail"]

    def chunks():  # no Content-Length: the limit applies to the bytes as they arrive
        for _ in range(limit // 65_536 + 2):
            yield b" " * 65_536

    assert_problem(
        client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}), 413
    )
    assert counts() == (0, 0)


def test_unknown_routes_and_methods_are_problems(client):
    assert_problem(client.get("/v1/nothing-here"), 404)
    assert_problem(client.get("/nothing"), 404)
    problem = assert_problem(client.delete("/v1/jobs"), 405)
    assert "POST" in client.delete("/v1/jobs").headers["allow"]
    assert "DELETE" in problem["detail"]


def test_an_unexpected_error_is_a_500_problem_without_internals(app):
    from fastapi.testclient import TestClient

    def explode() -> None:
        raise RuntimeError("secret internal detail at /srv/esgd/internal.py")

    app.add_api_route("/explode", explode)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/explode")
    problem = assert_problem(response, 500)
    assert "secret" not in response.text and "internal.py" not in response.text
    assert problem["title"] == "Internal Server Error"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
SPEC_KEYS = st.sampled_from(
    [
        "name",
        "dataset",
        "model",
        "optimizer",
        "objectives",
        "budget",
        "search_space",
        "sampler",
        "pruner",
        "seed",
    ]
)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.dictionaries(SPEC_KEYS, JSON_VALUES, max_size=5) | JSON_VALUES)
def test_arbitrary_json_never_gets_a_5xx(client, body):
    text = json.dumps(body)  # NaN and Infinity included: Python writes them as bare tokens
    response = post_raw(client, text)
    assert response.status_code < 500, response.text
    if response.status_code != 202:
        assert response.headers["content-type"].startswith("application/problem+json")
