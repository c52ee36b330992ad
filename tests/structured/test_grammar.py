"""Grammar specs: what compiles, what is refused (and which field the error names), the cache."""

from __future__ import annotations

import json

import pytest

from quept.structured.grammar import GrammarError, GrammarSpec

SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "array", "items": {"type": "integer"},
                                                                          "maxItems": 2}},
          "required": ["a", "b"], "additionalProperties": False}


def accepts(compiler, spec: GrammarSpec, text: str) -> bool:
    """Whether the grammar accepts `text` whole (tokenized by the tokenizer, then end of sequence)."""
    m = compiler.compile(spec).matcher()
    ids = compiler.tokenizer.tokenize_str(text)
    return all(m.consume_token(t) for t in ids) and m.is_accepting()


@pytest.mark.parametrize(("spec", "good", "bad"), [
    (GrammarSpec.json_schema(SCHEMA, "response_format"), '{"a":"x","b":[1,2]}', '{"a":"z","b":[]}'),
    (GrammarSpec.json_schema(json.dumps(SCHEMA), "guided_json"), '{"a":"y","b":[]}', '{"a":"y"}'),
    (GrammarSpec("json_object", "", "response_format"), '{"k":[1,{"n":null}]}', '[1]'),
    (GrammarSpec("regex", "[ab]{3}-\\d", "guided_regex"), "aba-7", "abc-7"),
    (GrammarSpec.choice(["yes", "no", 'say "hi"'], "guided_choice"), 'say "hi"', "maybe"),
    (GrammarSpec("grammar", 'start: "(" start ")" | "x"', "guided_grammar"), "((x))", "((x)"),
    (GrammarSpec("grammar", 'root ::= item ("," item)*\nitem ::= [a-c]+', "guided_grammar"), "ab,c", "ab,"),
])
def test_grammars_accept_and_reject(compiler, spec, good, bad) -> None:
    assert accepts(compiler, spec, good)
    assert not accepts(compiler, spec, bad)


@pytest.mark.parametrize(("make", "param", "words"), [
    (lambda: GrammarSpec.json_schema("{not json", "guided_json"), "guided_json", "not valid JSON"),
    (lambda: GrammarSpec.json_schema([1], "response_format"), "response_format", "object or a boolean"),
    (lambda: GrammarSpec.json_schema({"type": "objectx"}, "response_format"), "response_format", "not a valid JSON schema"),
    (lambda: GrammarSpec.json_schema({"properties": {"a": {"minLength": -1}}}, "response_format"), "response_format",
     "properties/a/minLength"),
    (lambda: GrammarSpec.choice([], "guided_choice"), "guided_choice", "non-empty list"),
    (lambda: GrammarSpec.choice(["a", 1], "guided_choice"), "guided_choice", "non-empty list"),
])
def test_malformed_specs_name_their_field(make, param, words) -> None:
    with pytest.raises(GrammarError, match=words) as err:
        make()
    assert err.value.param == param


@pytest.mark.parametrize(("spec", "words"), [
    (GrammarSpec.json_schema({"not": {"type": "string"}}, "response_format"), "not"),
    (GrammarSpec.json_schema({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "response_format"), "missing"),
    (GrammarSpec.json_schema({"type": "string", "pattern": "(?<=a)b"}, "response_format"), "look-around"),
    (GrammarSpec("regex", "a(b", "guided_regex"), "unclosed group"),
    (GrammarSpec("grammar", "start: undefined_rule", "guided_grammar"), "undefined_rule"),
    (GrammarSpec("grammar", "root ::= missing_rule", "guided_grammar"), "missing_rule"),
    (GrammarSpec("grammar", 'root ::= "a" (', "guided_grammar"), "Expected"),
])
def test_unsupported_grammars_are_refused_at_compile(compiler, spec, words) -> None:
    with pytest.raises(GrammarError, match=words) as err:
        compiler.compile(spec)
    assert err.value.param == spec.param


def test_compiled_grammars_are_cached_and_matchers_independent(compiler) -> None:
    spec = GrammarSpec("regex", "ab+", "guided_regex")
    g = compiler.compile(spec)
    assert compiler.compile(GrammarSpec("regex", "ab+", "guided_regex")) is g
    m1, m2 = g.matcher(), g.matcher()
    assert m1.consume_token(compiler.tokenizer.tokenize_str("a")[0])
    assert not m1.is_accepting() and not m2.is_accepting()
    assert m2.consume_token(compiler.tokenizer.tokenize_str("a")[0])


def test_cache_keeps_the_most_recent() -> None:
    from quept.structured.grammar import GrammarCompiler
    from tests.tiny import TINY_VOCAB, tiny_tokenizer

    c = GrammarCompiler(tiny_tokenizer(), TINY_VOCAB, (), cache_size=2)
    specs = [GrammarSpec("regex", f"a{{{k}}}", "guided_regex") for k in range(1, 4)]
    first = c.compile(specs[0])
    c.compile(specs[1])
    assert c.compile(specs[0]) is first  # used again: now the most recent
    c.compile(specs[2])  # evicts specs[1]
    assert c.num_cached == 2 and c.compile(specs[0]) is first
