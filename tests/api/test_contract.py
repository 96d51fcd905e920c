"""One API contract: the query parameters are InfluenceParams, and every surface asks it (client, CLI, REST).

The scorings are named once (proponent.api.registry.SCORINGS) and implemented under the same names.
"""

from __future__ import annotations

import inspect
import typing

import pytest

from proponent.api.registry import SCORINGS, Registry, ScoringName
from proponent.api.schemas import DEFAULT_SCORING, IndexInfo, InfluenceParams, QueryInfo
from proponent.cli import build_parser
from proponent.cli.query import CLI_DEFAULTS, CLI_DEST, CLI_WITHOUT
from proponent.client import AsyncInfluenceClient, InfluenceClient
from proponent.query.scoring import SCORERS

FIELDS = InfluenceParams.model_fields


@pytest.mark.parametrize("method", [InfluenceClient.influence, AsyncInfluenceClient.influence])
def test_client_keywords_are_the_parameters_with_their_defaults(method) -> None:
    sig = inspect.signature(method)
    keywords = {n: p for n, p in sig.parameters.items() if n not in ("self", "query", "sample_id")}
    assert list(keywords) == [n for n in keywords if n in FIELDS] and set(keywords) == set(FIELDS)
    for name, p in keywords.items():
        expected = None if name == "scoring" else FIELDS[name].default  # None: the server's default scoring
        assert p.default == expected, name
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, name


def _influence_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["influence"]


def test_cli_flags_are_the_parameters_with_their_choices_and_defaults() -> None:
    options = {a.dest: a for a in _influence_parser()._actions}
    for name, field in FIELDS.items():
        if name in CLI_WITHOUT:
            assert CLI_DEST.get(name, name) not in options, name
            continue
        action = options[CLI_DEST.get(name, name)]
        assert action.default == CLI_DEFAULTS.get(name, field.default), name
        args = typing.get_args(field.annotation)
        if args and all(isinstance(x, str) for x in args):  # a Literal: the flag offers exactly its values
            assert list(action.choices) == list(args), name


def test_cli_builds_the_same_parameters_as_the_api_defaults() -> None:
    from proponent.cli.query import influence_params

    a = _influence_parser().parse_args(["--index", "x", "--sample-id", "0"])
    p = influence_params(a)
    expected = InfluenceParams(**CLI_DEFAULTS)
    assert p == expected
    a = _influence_parser().parse_args(["--index", "x", "--sample-id", "0", "--resize", "--scoring", "raw"])
    assert influence_params(a).allow_resize and influence_params(a).scoring == "raw"


def test_rest_bodies_document_exactly_the_parameters() -> None:
    from proponent.service.routes.influence import _JSON_SCHEMA, _UPLOAD_SCHEMA

    assert set(_UPLOAD_SCHEMA["properties"]) - {"file"} == set(FIELDS)
    assert set(_JSON_SCHEMA["properties"]) - {"x"} == set(FIELDS)


def test_scorings_are_named_once_and_implemented_under_those_names() -> None:
    assert tuple(SCORINGS) == typing.get_args(ScoringName) == typing.get_args(FIELDS["scoring"].annotation)
    assert set(SCORERS) == set(SCORINGS)
    assert DEFAULT_SCORING == SCORINGS.default == FIELDS["scoring"].default
    assert QueryInfo.model_fields["scoring"].default == SCORINGS.default  # was "raw" while the server said cosine
    assert IndexInfo.model_fields["scorings"].default_factory() == list(SCORINGS)  # type: ignore[call-arg,misc]
    with pytest.raises(ValueError, match=r"scoring must be one of raw, cosine, relatif, got 'dot'"):
        SCORINGS.check("dot")


def test_a_registry_refuses_summaries_or_a_default_that_are_not_its_names() -> None:
    names = typing.Literal["a", "b"]
    with pytest.raises(TypeError, match="summaries"):
        Registry("thing", names, {"a": "x"}, default="a")
    with pytest.raises(TypeError, match="default"):
        Registry("thing", names, {"a": "x", "b": "y"}, default="c")
    r = Registry("thing", names, {"a": "x", "b": "y"}, default="b")
    assert list(r) == ["a", "b"] and "b" in r and len(r) == 2 and r[0] == "a"
    assert r.describe() == "a (x); b (y) [default]"
