"""Tools and structured output by composition: ``bind``/``bind_tools`` plus a parser."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.language_models import LanguageModelInput
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from specthink.errors import ConfigError

__all__ = [
    "StructuredMethod",
    "ToolLike",
    "format_tools",
    "normalize_tool_choice",
    "response_format_for",
    "structured_runnable",
]

StructuredMethod = Literal["function_calling", "json_schema", "json_mode"]
ToolLike = dict[str, Any] | type | Callable[..., Any] | BaseTool


def format_tools(tools: Sequence[ToolLike], *, strict: bool | None = None,
                 ) -> list[dict[str, Any]]:
    """Any LangChain tool form (``BaseTool``, function, pydantic class, dict) as an OpenAI tool."""
    return [convert_to_openai_tool(tool, strict=strict) for tool in tools]


def normalize_tool_choice(tool_choice: object, tools: Sequence[dict[str, Any]],
                          ) -> str | dict[str, Any] | None:
    """LangChain's ``tool_choice`` spellings in the OpenAI form the prompts understand.

    ``"any"``/``"required"``/``True`` force some tool call (``True`` with one tool forces that
    tool, as ``ChatOpenAI`` does); ``"auto"``/``None`` leave the choice to the model;
    ``"none"``/``False`` hide the tools; a tool name or ``{"type": "function", "function":
    {"name": ...}}`` forces that tool.
    """
    names = [tool["function"]["name"] for tool in tools]
    if tool_choice not in (None, False, "auto", "none") and not names:
        raise ConfigError(f"tool_choice={tool_choice!r} needs tools, but no tools were given")
    if tool_choice is None or tool_choice == "auto":
        return None if tool_choice is None else "auto"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if tool_choice is True:
        return _named(names[0]) if len(names) == 1 else "required"
    if tool_choice in ("any", "required"):
        return "required"
    if isinstance(tool_choice, str):
        if tool_choice not in names:
            raise ConfigError(f"tool_choice names the tool {tool_choice!r}, which is not among "
                              f"the tools offered: {', '.join(names) or '(none)'}")
        return _named(tool_choice)
    if isinstance(tool_choice, dict):
        return tool_choice
    raise ConfigError(f"tool_choice must be a tool name, 'auto', 'any', 'required', 'none', "
                      f"a bool or an OpenAI tool_choice dict; got {tool_choice!r}")


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def response_format_for(schema: dict[str, Any] | type | None, method: StructuredMethod,
                        strict: bool | None) -> dict[str, Any]:
    """The ``response_format`` call argument of the ``json_schema`` and ``json_mode`` methods."""
    if method == "json_mode":
        return {"type": "json_object"}
    if schema is None:
        raise ConfigError("method='json_schema' needs a schema")
    json_schema = convert_to_json_schema(schema)
    name = str(json_schema.get("title") or "response")
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": json_schema, "strict": bool(strict)}}


def structured_runnable(
    bound: Runnable[LanguageModelInput, Any],
    schema: dict[str, Any] | type | None,
    method: StructuredMethod,
    *,
    include_raw: bool,
) -> Runnable[LanguageModelInput, Any]:
    """``bound`` (the model with tools or a response format bound) followed by its parser."""
    parser: Runnable[Any, Any]
    pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    if method == "function_calling":
        if pydantic:
            parser = PydanticToolsParser(tools=[schema], first_tool_only=True)
        else:
            assert schema is not None
            key_name = convert_to_openai_tool(schema)["function"]["name"]
            parser = JsonOutputKeyToolsParser(key_name=key_name, first_tool_only=True)
    elif pydantic:
        parser = PydanticOutputParser(pydantic_object=schema)
    else:
        parser = JsonOutputParser()
    if not include_raw:
        return bound | parser
    parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                       parsing_error=lambda _: None)
    keep_raw = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parse.with_fallbacks([keep_raw],
                                                         exception_key="parsing_error")
