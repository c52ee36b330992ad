"""Grammar specs, their validation and compilation against a tokenizer (llguidance).

Compiling a grammar builds its lexer and parser (milliseconds for most JSON schemas, up to a second
for large ones); the result is cached by spec, and each sequence takes a cheap copy of a fresh
matcher. A spec that is malformed, or uses a feature the grammar engine does not implement (JSON
Schema's `not`, look-around in a regex, ...), raises `GrammarError` naming the request field.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema
import llguidance
import llguidance.hf
from llguidance.gbnf_to_lark import any_to_lark

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
# JSON as json.dumps writes it: flexible whitespace lets a small or low-width model spend its tokens on
# runs of spaces and newlines between the keys (vLLM's `disable_any_whitespace`)
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A grammar the server cannot use; `param` names the request field that holds it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to; `source` is the schema (JSON text), the regex, the
    choices (a JSON list) or the grammar (Lark, or GBNF as llama.cpp and vLLM's xgrammar take it:
    `root ::= ...`, converted to Lark); `param` is the field it came from (for errors)."""

    kind: Kind
    source: str
    param: str

    @staticmethod
    def json_schema(schema: Any, param: str) -> "GrammarSpec":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise GrammarError(f"{param}: the schema is not valid JSON ({err})", param) from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"{param}: a JSON schema is an object or a boolean, got {type(schema).__name__}", param)
        try:
            jsonschema.validators.validator_for(schema if isinstance(schema, dict) else {}).check_schema(schema)
        except jsonschema.SchemaError as err:
            where = "/".join(str(p) for p in err.path)
            raise GrammarError(f"{param}: not a valid JSON schema{' at ' + where if where else ''}: {err.message}",
                               param) from None
        return GrammarSpec("json_schema", json.dumps(schema), param)  # key order kept: it is the output's

    @staticmethod
    def choice(options: list[str], param: str) -> "GrammarSpec":
        if not options or not all(isinstance(o, str) for o in options):
            raise GrammarError(f"{param}: give a non-empty list of strings", param)
        return GrammarSpec("choice", json.dumps(options), param)

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's own form."""
        M = llguidance.LLMatcher
        if self.kind == "json_schema":
            return M.grammar_from_json_schema(self.source, JSON_OPTIONS)
        if self.kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
        if self.kind == "regex":
            return M.grammar_from_regex(self.source)
        if self.kind == "choice":
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in json.loads(self.source)))
        try:
            lark = any_to_lark(self.source)
        except Exception as err:  # the converter raises bare Exceptions for unknown rules
            raise ValueError(f"not a Lark or GBNF grammar: {err}") from None
        return M.grammar_from_lark(lark)


class Grammar:
    """A compiled grammar: `matcher()` is a fresh matcher for one sequence."""

    def __init__(self, spec: GrammarSpec, template: llguidance.LLMatcher) -> None:
        self.spec = spec
        self._template = template

    def matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles specs for one tokenizer; keeps the last `cache_size` grammars (thread-safe: the
    server compiles on its worker threads)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...], cache_size: int = 256) -> None:
        self._hf = tokenizer
        self._vocab = vocab_size
        self._eos = list(eos_ids) or None
        self._tok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (built on first use: about half a second)."""
        with self._lock:
            if self._tok is None:
                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab, eos_token=self._eos)
            return self._tok

    def compile(self, spec: GrammarSpec) -> Grammar:
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        tok = self.tokenizer
        try:
            source = spec.llguidance_grammar()
        except ValueError as err:
            raise GrammarError(f"{spec.param}: {err}", spec.param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, tok)
        if is_error:
            raise GrammarError(f"{spec.param}: {messages[0].strip()}", spec.param)
        template = llguidance.LLMatcher(tok, source, log_level=0)
        if template.is_error():
            raise GrammarError(f"{spec.param}: {template.get_error()}", spec.param)
        grammar = Grammar(spec, template)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return grammar

    def has(self, spec: GrammarSpec) -> bool:
        """Whether `spec` is compiled already (the next `compile` is a cache hit)."""
        return spec in self._cache

    @property
    def num_cached(self) -> int:
        return len(self._cache)
