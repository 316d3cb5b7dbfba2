"""Chat templates: validation, the built-in layouts, server rendering, BOS and tool_choice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from specthink.errors import ConfigError
from specthink.prompts import (
    CHATML,
    DEEPSEEK_R1,
    ChatTemplate,
    JinjaTemplate,
    ServerTemplate,
    apply_tool_choice,
    render_prompt,
    resolve_template,
    tool_instruction,
    validate_messages,
)
from specthink.tools import parse_tool_calls

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather <in °C>",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}
CLOCK: dict[str, Any] = {"type": "function",
                         "function": {"name": "now", "parameters": {"type": "object"}}}

TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
    ]},
    {"role": "tool", "tool_call_id": "a", "content": "18"},
    {"role": "tool", "tool_call_id": "b", "content": "25"},
    {"role": "assistant", "content": "Paris 18, Rome 25."},
    {"role": "user", "content": "Thanks!"},
]

HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": '
    '"Current weather <in °C>", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}, "required": ["city"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


class FakeBackend:
    """A backend as far as templates care: BOS handling and optional server rendering."""

    def __init__(self, *, adds_bos_token: bool = False, rendered: str | None = None,
                 renders_chat_template: bool = False) -> None:
        self.url = "http://127.0.0.1:1"
        self.adds_bos_token = adds_bos_token
        self.renders_chat_template = renders_chat_template
        self.rendered = rendered
        self.calls: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = []

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None) -> str | None:
        self.calls.append((list(messages), None if tools is None else list(tools)))
        return self.rendered


# --- validation ------------------------------------------------------------------------------

def test_empty_messages_are_rejected_before_any_request() -> None:
    with pytest.raises(ConfigError, match="messages is empty"):
        validate_messages([])


def test_an_unknown_role_names_the_index_and_the_allowed_roles() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "beep"}]

    with pytest.raises(ConfigError) as caught:
        validate_messages(messages)

    message = str(caught.value)
    assert "messages[1]" in message
    assert "'robot'" in message
    assert "'system', 'user', 'assistant', 'tool'" in message


def test_a_missing_role_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"messages\[0\] has no role"):
        validate_messages([{"content": "Hi"}])


def test_non_text_content_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"messages\[0\]\.content is a dict"):
        validate_messages([{"role": "user", "content": {"text": "Hi"}}])


def test_config_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="messages is empty"):
        validate_messages([])


def test_messages_are_normalised_without_touching_the_input() -> None:
    assistant: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "function": {"name": "now", "arguments": "{}"}}]}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
                                                                       "text": "there"}]},
        assistant,
        {"role": "tool", "content": None, "tool_call_id": "c1"},
    ]

    user, call, tool = validate_messages(messages)

    assert user["content"] == "Hi there"
    assert call["content"] is None
    assert call["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "now", "arguments": {}}}]
    assert tool == {"role": "tool", "content": "", "tool_call_id": "c1"}
    assert assistant["tool_calls"][0]["function"]["arguments"] == "{}"


def test_a_tool_message_without_a_preceding_call_is_accepted() -> None:
    assert validate_messages([{"role": "tool", "content": "42"}])[0]["content"] == "42"


def test_a_parsed_tool_call_can_be_sent_back() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "now", "arguments": {"tz": "UTC"}}'
                                "</tool_call>")
    message: dict[str, Any] = {"role": "assistant", "content": "",
               "tool_calls": [call.to_openai() for call in calls]}

    (normalised,) = validate_messages([message])

    assert normalised["tool_calls"][0]["function"] == {"name": "now",
                                                       "arguments": {"tz": "UTC"}}


def test_a_tool_call_without_a_name_is_rejected() -> None:
    message: dict[str, Any] = {"role": "assistant", "content": None,
                               "tool_calls": [{"function": {}}]}

    with pytest.raises(ConfigError, match=r"messages\[0\]\.tool_calls\[0\] has no function"):
        validate_messages([message])


# --- built-in templates ----------------------------------------------------------------------

def test_chatml_renders_qwen25_tool_turns() -> None:
    """The layout of Qwen2.5-Instruct's template, given a system message."""
    prompt = CHATML.render_text(TOOL_CONVERSATION, [WEATHER])

    assert prompt == (
        f"<|im_start|>system\nBe brief.\n\n{HERMES_TOOLS}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18\n</tool_response>\n"
        "<tool_response>\n25\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nParis 18, Rome 25.<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chatml_puts_content_before_the_tool_calls() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Checking.",
         "tool_calls": [{"function": {"name": "now", "arguments": {}}}]}]

    prompt = CHATML.render_text(messages)

    assert ('<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "now", "arguments": {}}\n'
            "</tool_call><|im_end|>\n") in prompt


def test_chatml_adds_no_default_system_prompt() -> None:
    prompt = CHATML.render_text([{"role": "user", "content": "Hi"}])

    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_default_system_prompt_is_a_variable() -> None:
    qwen = JinjaTemplate(CHATML.source, variables={"default_system": "You are Qwen."})

    prompt = qwen.render_text([{"role": "user", "content": "Hi"}])

    assert prompt.startswith("<|im_start|>system\nYou are Qwen.<|im_end|>\n")


def test_deepseek_r1_opens_the_reasoning_in_the_generation_prompt() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n4"},
                {"role": "user", "content": "3+3?"}]

    prompt = DEEPSEEK_R1.render_text(messages)

    assert prompt == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>\n\n4"
                      "<｜end▁of▁sentence｜><｜User｜>3+3?<｜Assistant｜><think>\n")


def test_deepseek_r1_renders_tools_in_the_hermes_form() -> None:
    prompt = DEEPSEEK_R1.render_text(TOOL_CONVERSATION, [WEATHER])

    assert prompt == (
        f"<｜begin▁of▁sentence｜>Be brief.\n\n{HERMES_TOOLS}"
        "<｜User｜>Weather in Paris and Rome?<｜Assistant｜>"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
        "<｜end▁of▁sentence｜>"
        "<｜User｜><tool_response>\n18\n</tool_response>\n<tool_response>\n25\n</tool_response>"
        "<｜Assistant｜>Paris 18, Rome 25.<｜end▁of▁sentence｜>"
        "<｜User｜>Thanks!<｜Assistant｜><think>\n"
    )


# --- Jinja templates -------------------------------------------------------------------------

def test_a_template_can_reject_messages_with_raise_exception() -> None:
    template = JinjaTemplate("{% if messages[0].role != 'user' %}"
                             "{{ raise_exception('Conversations must start with a user turn') }}"
                             "{% endif %}{{ messages[0].content }}")

    with pytest.raises(ConfigError, match="must start with a user turn"):
        template.render_text([{"role": "system", "content": "x"}])


def test_a_template_that_does_not_compile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        JinjaTemplate("{% for m in messages %}")


def test_the_template_sandbox_blocks_attribute_escapes() -> None:
    template = JinjaTemplate("{{ messages.__class__.__mro__ }}")

    with pytest.raises(ConfigError):
        template.render_text([{"role": "user", "content": "x"}])


# --- server templates, BOS, resolution -------------------------------------------------------

async def test_server_template_asks_the_backend() -> None:
    backend = FakeBackend(rendered="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    prompt = await render_prompt(ServerTemplate(), [{"role": "user", "content": "Hi"}],
                                 [CLOCK], backend)

    assert prompt == backend.rendered
    assert backend.calls == [([{"role": "user", "content": "Hi"}], [CLOCK])]


async def test_server_template_without_server_rendering_says_what_to_choose() -> None:
    backend = FakeBackend(rendered=None)

    with pytest.raises(ConfigError, match="choose a client-side template"):
        await render_prompt(ServerTemplate(), [{"role": "user", "content": "Hi"}], None, backend)


async def test_bos_is_not_sent_twice() -> None:
    """TGI's /generate adds BOS itself; a template's BOS text would become a second BOS."""
    messages = [{"role": "user", "content": "Hi"}]

    stripped = await render_prompt(DEEPSEEK_R1, messages, None, FakeBackend(adds_bos_token=True))
    kept = await render_prompt(DEEPSEEK_R1, messages, None, FakeBackend(adds_bos_token=False))

    assert stripped == "<｜User｜>Hi<｜Assistant｜><think>\n"
    assert kept == "<｜begin▁of▁sentence｜>" + stripped


async def test_common_bos_texts_are_stripped_from_server_and_custom_templates() -> None:
    backend = FakeBackend(adds_bos_token=True, rendered="<s>[INST] Hi [/INST]")
    llama3 = JinjaTemplate("<|begin_of_text|>{{ messages[0].content }}")

    server_prompt = await render_prompt(ServerTemplate(), [{"role": "user", "content": "Hi"}],
                                        None, backend)
    custom_prompt = await render_prompt(llama3, [{"role": "user", "content": "Hi"}], None,
                                        backend)

    assert server_prompt == "[INST] Hi [/INST]"
    assert custom_prompt == "Hi"


def test_auto_uses_the_server_template_where_the_backend_renders_one() -> None:
    assert isinstance(resolve_template("auto", FakeBackend(renders_chat_template=True)),
                      ServerTemplate)
    assert resolve_template("auto", FakeBackend()) is CHATML


def test_templates_resolve_by_name_or_source() -> None:
    backend = FakeBackend()
    custom = resolve_template("{{ messages[0].content }}", backend)

    assert resolve_template("chatml", backend) is CHATML
    assert resolve_template("deepseek-r1", backend) is DEEPSEEK_R1
    assert isinstance(resolve_template("server", backend), ServerTemplate)
    assert resolve_template(DEEPSEEK_R1, backend) is DEEPSEEK_R1
    assert isinstance(custom, JinjaTemplate)
    assert custom.render_text([{"role": "user", "content": "echo"}]) == "echo"


def test_an_unknown_template_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="'chatml', 'deepseek-r1'"):
        resolve_template("llama", FakeBackend())


async def test_a_custom_chat_template_subclass_plugs_in() -> None:
    class Plain(ChatTemplate):
        async def render(self, messages: Any, tools: Any, backend: Any) -> str:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    prompt = await render_prompt(Plain(), [{"role": "user", "content": "Hi"}], None,
                                 FakeBackend())

    assert prompt == "user: Hi\nassistant:"


# --- tool_choice -----------------------------------------------------------------------------

def test_tool_choice_auto_needs_no_instruction() -> None:
    assert tool_instruction("auto", [WEATHER]) is None
    assert tool_instruction(None, [WEATHER]) is None


def test_tool_choice_none_hides_the_tools() -> None:
    messages, tools = apply_tool_choice([{"role": "user", "content": "Hi"}], [WEATHER], "none")

    assert tools is None
    assert "# Tools" not in CHATML.render_text(messages, tools)


def test_tool_choice_required_asks_for_any_tool() -> None:
    messages, tools = apply_tool_choice([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi"}],
                                        [WEATHER, CLOCK], "required")

    assert messages[0] == {"role": "system",
                           "content": "Be brief.\n\nYou must call one of the tools."}
    assert tools == [WEATHER, CLOCK]


def test_tool_choice_by_name_offers_only_that_tool() -> None:
    choice = {"type": "function", "function": {"name": "now"}}

    messages, tools = apply_tool_choice([{"role": "user", "content": "Time?"}],
                                        [WEATHER, CLOCK], choice)

    assert messages[0] == {"role": "system", "content": "You must call the tool now."}
    assert tools == [CLOCK]


def test_tool_choice_naming_an_unknown_tool_lists_the_offered_ones() -> None:
    with pytest.raises(ConfigError, match=r"'search'.*offered: get_weather, now"):
        apply_tool_choice([{"role": "user", "content": "Hi"}], [WEATHER, CLOCK], "search")


def test_tool_choice_required_without_tools_is_an_error() -> None:
    with pytest.raises(ConfigError, match="needs tools"):
        tool_instruction("required", None)


def test_bare_function_definitions_are_accepted_as_tools() -> None:
    _, tools = apply_tool_choice([{"role": "user", "content": "Time?"}], [CLOCK["function"]])

    assert tools == [CLOCK]


async def test_render_prompt_applies_tool_choice() -> None:
    prompt = await render_prompt(CHATML, [{"role": "user", "content": "Time?"}],
                                 [WEATHER, CLOCK], FakeBackend(), tool_choice="now")

    assert prompt.startswith("<|im_start|>system\nYou must call the tool now.\n\n# Tools")
    assert '"name": "get_weather"' not in prompt
