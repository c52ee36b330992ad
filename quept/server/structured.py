"""What a request's structured-output and tool fields ask for, as one grammar spec (or none).

The fields: OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and their newer `structured_outputs`, and on chat
`tools` with `tool_choice` `required` or a named function. At most one of them may constrain a
request; two that would (or a constraint beside tools the model may call) are a 400 that names the
second field, as is a malformed schema or a `tool_choice` that names no tool.
"""

from __future__ import annotations

from dataclasses import dataclass

from quept.server import protocol as P
from quept.server.errors import APIError
from quept.server.tools import call_grammar
from quept.structured.grammar import GrammarError, GrammarSpec


@dataclass(frozen=True)
class Constraint:
    """A request's grammar (None: free text) and the tools whose calls the output may hold."""

    grammar: GrammarSpec | None
    tools: tuple[P.Tool, ...] = ()


def _invalid(err: GrammarError) -> APIError:
    return APIError(400, str(err), param=err.param, code="invalid_value")


def _format_specs(body: P.SamplingFields) -> list[GrammarSpec]:
    specs: list[GrammarSpec] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        specs.append(GrammarSpec("json_object", "", "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                           param="response_format.json_schema", code="invalid_value")
        specs.append(GrammarSpec.json_schema(rf.json_schema.schema_, "response_format"))
    if body.guided_json is not None:
        specs.append(GrammarSpec.json_schema(body.guided_json, "guided_json"))
    if body.guided_regex is not None:
        specs.append(GrammarSpec("regex", body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        specs.append(GrammarSpec.choice(body.guided_choice, "guided_choice"))
    if body.guided_grammar is not None:
        specs.append(GrammarSpec("grammar", body.guided_grammar, "guided_grammar"))
    so = body.structured_outputs
    if so is not None:
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(so, name) is not None]
        given += ["json_object"] if so.json_object else []
        if len(given) != 1:
            raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                           param="structured_outputs", code="invalid_value")
        param = f"structured_outputs.{given[0].rstrip('_')}"
        if so.json_ is not None:
            specs.append(GrammarSpec.json_schema(so.json_, param))
        elif so.regex is not None:
            specs.append(GrammarSpec("regex", so.regex, param))
        elif so.choice is not None:
            specs.append(GrammarSpec.choice(so.choice, param))
        elif so.grammar is not None:
            specs.append(GrammarSpec("grammar", so.grammar, param))
        else:
            specs.append(GrammarSpec("json_object", "", param))
    return specs


def _tools(body: P.ChatCompletionRequest) -> tuple[tuple[P.Tool, ...], GrammarSpec | None]:
    """The tools the model may call and the grammar that forces a call (tool_choice required/named)."""
    choice = body.tool_choice
    tools = tuple(body.tools or ())
    if not tools:
        if choice is not None and choice != "none":
            raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        return (), None
    names = [t.function.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(400, f"two tools are named {dup!r}", param="tools", code="invalid_value")
    for i, t in enumerate(tools):
        if t.function.parameters is not None:
            GrammarSpec.json_schema(t.function.parameters, f"tools.{i}.function.parameters")
    if choice == "none":
        return (), None
    if isinstance(choice, P.NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools "
                                f"({', '.join(names)})", param="tool_choice", code="invalid_value")
        return tools, call_grammar(tools, choice.function.name, False)
    if choice == "required":
        return tools, call_grammar(tools, None, body.parallel_tool_calls)
    return tools, None


def constraint_of(body: P.SamplingFields) -> Constraint:
    """The request's constraint, or a 400 naming the field that is malformed or contradicts another."""
    try:
        specs = _format_specs(body)
        tools, forced = _tools(body) if isinstance(body, P.ChatCompletionRequest) else ((), None)
    except GrammarError as err:
        raise _invalid(err) from None
    if len(specs) > 1:
        raise APIError(400, f"{specs[1].param} and {specs[0].param} both constrain the output; set one",
                       param=specs[1].param, code="invalid_value")
    if specs and tools:
        raise APIError(400, f"{specs[0].param} cannot be combined with tools the model may call (use tool_choice "
                            "\"none\", or drop it)", param=specs[0].param, code="invalid_value")
    return Constraint(forced or (specs[0] if specs else None), tools)
