"""Chat templates: validation, the built-in layouts, server rendering, BOS and tool_choice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from specthink.backends import create
from specthink.backends.base import ServerInfo
from specthink.errors import BackendError, ConfigError
from specthink.prompts import (
    CHATML,
    DEEPSEEK_R1,
    LLAMA3,
    MISTRAL,
    AutoTemplate,
    ChatTemplate,
    JinjaTemplate,
    ServerTemplate,
    apply_tool_choice,
    render_prompt,
    resolve_template,
    tool_instruction,
    validate_messages,
)
from specthink.testing.models import EchoModel
from specthink.testing.server import Flavor, LoopbackServer
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
HI: list[dict[str, Any]] = [{"role": "user", "content": "Hi"}]
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
                 model_id: str = "Qwen/Qwen2.5-7B-Instruct", keeps_tool_turns: bool = True,
                 ) -> None:
        self.url = "http://127.0.0.1:1"
        self.adds_bos_token = adds_bos_token
        self.keeps_tool_turns = keeps_tool_turns
        self.rendered = rendered
        self.model_id = model_id
        self.calls: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = []
        self.tool_choices: list[object] = []

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None) -> str | None:
        self.calls.append((list(messages), None if tools is None else list(tools)))
        self.tool_choices.append(tool_choice)
        return self.rendered

    async def info(self) -> ServerInfo:
        return ServerInfo(model_id=self.model_id)


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


REAL_TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
DESCRIBED_CLOCK: dict[str, Any] = {"type": "function", "function": {
    "name": "now", "description": "The time.", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("template_file", [
    "ibm-granite-granite-3.3-2B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja",
    "openai-gpt-oss-120b.jinja", "mistralai-Ministral-3-14B-Reasoning-2512.jinja"])
def test_a_call_only_turn_renders_in_templates_that_concatenate_its_content(
        template_file: str) -> None:
    """If this fails, a tool loop cannot be rendered client-side for Granite or Qwen3: their
    templates concatenate ``message.content``, and an assistant turn that only calls a tool
    (``content: None``, as OpenAI clients send it) must reach them as ``""``, as vLLM hands it
    (``chat_utils._parse_chat_message_content``), without breaking gpt-oss's or Mistral's."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    source = (REAL_TEMPLATES / template_file).read_text(encoding="utf-8")
    expected, _ = chat_template_utils.render_jinja_template(
        [[*HI, {"role": "assistant", "content": "",
                "tool_calls": [{"id": "1", "type": "function",
                                "function": {"name": "now", "arguments": {}}}]},
          {"role": "tool", "content": "12:00", "tool_call_id": "1"}]],
        tools=[DESCRIBED_CLOCK], chat_template=source, add_generation_prompt=True,
        bos_token="<s>", eos_token="</s>")
    template = JinjaTemplate(source, bos_token="<s>", eos_token="</s>")
    assert template.render_text(TOOL_TURNS, [DESCRIBED_CLOCK]) == expected[0]


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


async def test_auto_uses_the_server_template_where_the_backend_renders_one() -> None:
    """If this fails, a server's own template is ignored for a guessed one."""
    backend = FakeBackend(rendered="[server]", model_id="google/gemma-3-4b-it")
    assert await render_prompt(resolve_template("auto"), HI, None, backend) == "[server]"


@pytest.mark.parametrize(("model_id", "template"), [
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", DEEPSEEK_R1),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", DEEPSEEK_R1),
    ("Qwen/Qwen2.5-7B-Instruct", CHATML),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", CHATML),
    ("meta-llama/Llama-3.1-8B-Instruct", LLAMA3),
    ("mistralai/Mistral-7B-Instruct-v0.3", MISTRAL),
])
async def test_auto_picks_the_family_template_where_the_server_renders_none(
        model_id: str, template: JinjaTemplate) -> None:
    """A server without template rendering gets the built-in template of the model's family."""
    backend = FakeBackend(model_id=model_id)
    assert await render_prompt(resolve_template("auto"), HI, None, backend) == (
        await render_prompt(template, HI, None, backend))


async def test_auto_refuses_to_guess_an_unknown_family() -> None:
    """Gemma, Phi, gpt-oss...: no silent ChatML; the error names the option to pass."""
    backend = FakeBackend(model_id="google/gemma-3-4b-it")
    with pytest.raises(ConfigError, match=r"target_template=.*tokenizer_config\.json"):
        await render_prompt(resolve_template("auto", "target"), HI, None, backend)


async def test_auto_uses_the_family_template_for_tool_turns_on_tgi() -> None:
    """TGI flattens assistant tool calls and tool results, so those turns render client-side."""
    backend = FakeBackend(rendered="[server]", keeps_tool_turns=False,
                          model_id="Qwen/Qwen2.5-7B-Instruct")
    turns = [*HI, {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "1", "function": {"name": "now", "arguments": "{}"}}]},
             {"role": "tool", "content": "12:00", "tool_call_id": "1"}]
    prompt = await render_prompt(resolve_template("auto"), turns, [CLOCK], backend)
    assert prompt == CHATML.render_text(turns, [CLOCK])
    assert backend.calls == []


TOOL_TURNS: list[dict[str, Any]] = [
    *HI, {"role": "assistant", "content": None,
          "tool_calls": [{"id": "1", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "content": "12:00", "tool_call_id": "1"}]
THINKING_CHATML = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
"""How a QwQ / Qwen3 thinking checkpoint's own template ends: it opens the reasoning."""


async def test_tool_turns_on_tgi_end_as_the_servers_own_generation_prompt() -> None:
    """A ChatML model whose server template opens ``<think>`` never writes the tag itself; if
    this fails, after a tool turn on TGI (rendered with the family's ChatML) its reasoning
    arrives untagged and becomes the answer, drafted tool calls included."""
    backend = FakeBackend(rendered=THINKING_CHATML, keeps_tool_turns=False,
                          model_id="acme/Qwen2.5-7B-Reasoner")
    auto = resolve_template("auto")
    assert await render_prompt(auto, HI, [CLOCK], backend) == THINKING_CHATML
    prompt = await render_prompt(auto, TOOL_TURNS, [CLOCK], backend)
    assert prompt == CHATML.render_text(TOOL_TURNS, [CLOCK]) + "<think>\n"
    assert len(backend.calls) == 1  # learnt from the first turn's rendering, not asked again


@pytest.mark.parametrize(("model_id", "opens"), [
    ("Qwen/QwQ-32B", True), ("Qwen/Qwen3-30B-A3B-Thinking-2507", True),
    ("Qwen/QwQ-32B-Preview", False), ("Qwen/Qwen3-8B", False)])
async def test_before_any_server_rendering_the_model_id_says_whether_it_opens(
        model_id: str, opens: bool) -> None:
    """A conversation that starts with tool turns: QwQ and the Qwen3 thinking checkpoints open
    the reasoning in their template (QwQ's preview and the hybrid Qwen3 do not)."""
    backend = FakeBackend(rendered="[server]", keeps_tool_turns=False, model_id=model_id)
    prompt = await render_prompt(resolve_template("auto"), TOOL_TURNS, [CLOCK], backend)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") is opens
    assert backend.calls == []


@pytest.mark.parametrize(("model_id", "opens"), [
    ("Qwen/QwQ-32B", True), ("Qwen/Qwen3-4B-Thinking-2507", True), ("Qwen/Qwen3-8B", False),
    ("Qwen/Qwen2.5-7B-Instruct", False)])
async def test_a_server_that_renders_nothing_gets_the_thinking_opener_from_the_id(
        model_id: str, opens: bool) -> None:
    """llama-cpp-python renders no template: QwQ's built-in ChatML must still open the
    reasoning, or its untagged reasoning becomes the answer."""
    backend = FakeBackend(rendered=None, model_id=model_id)
    prompt = await render_prompt(resolve_template("auto"), HI, None, backend)
    assert prompt == CHATML.render_text(HI) + ("<think>\n" if opens else "")


async def test_only_chatml_thinking_ids_get_the_opener() -> None:
    """Thinking checkpoints of other families mark their reasoning otherwise: a Llama 3 model
    named "Thinking" keeps Llama 3's own generation prompt."""
    backend = FakeBackend(rendered=None, model_id="acme/Llama-3.1-8B-Thinking")
    prompt = await render_prompt(resolve_template("auto"), HI, None, backend)
    assert prompt == LLAMA3.render_text(HI)


async def test_tool_choice_reaches_a_server_that_renders_tools() -> None:
    """TGI offers its `no_tool` escape unless told the call is required."""
    backend = FakeBackend(rendered="[server]")
    for choice, sent in (("required", "required"), ("any", "required"), ("auto", "auto"),
                         ("now", {"type": "function", "function": {"name": "now"}})):
        await render_prompt(ServerTemplate(), HI, [CLOCK], backend, tool_choice=choice)
        assert backend.tool_choices[-1] == sent
    await render_prompt(ServerTemplate(), HI, [CLOCK], backend, tool_choice="none")
    assert backend.calls[-1][1] is None and backend.tool_choices[-1] is None


def test_a_tokenizer_config_file_is_a_template(tmp_path: Path) -> None:
    """A user's tokenizer_config.json wins: its chat_template, bos and eos tokens."""
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({
        "chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                         "{% endfor %}<assistant>",
        "bos_token": {"content": "<s>"}, "eos_token": "</s>"}), encoding="utf-8")
    template = resolve_template(str(config))
    assert isinstance(template, JinjaTemplate)
    assert template.render_text(HI) == "<s><user>Hi<assistant>"
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_template(str(tmp_path / "missing" / "tokenizer_config.json"))


def test_templates_resolve_by_name_or_source() -> None:
    custom = resolve_template("{{ messages[0].content }}")

    assert resolve_template("chatml") is CHATML
    assert resolve_template("deepseek-r1") is DEEPSEEK_R1
    assert resolve_template("llama3") is LLAMA3
    assert isinstance(resolve_template("server"), ServerTemplate)
    assert resolve_template(DEEPSEEK_R1) is DEEPSEEK_R1
    assert isinstance(custom, JinjaTemplate)
    assert custom.render_text([{"role": "user", "content": "echo"}]) == "echo"


def test_an_unknown_template_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="'chatml', 'deepseek-r1', 'llama3', 'mistral'"):
        resolve_template("gemma")


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


def test_llama3_and_mistral_lay_out_their_turns() -> None:
    """The built-in family templates write their models' turn markers, tools included."""
    assert LLAMA3.render_text([{"role": "system", "content": "Be brief."}, *HI]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert MISTRAL.render_text([{"role": "system", "content": "Be brief."}, *HI]) == (
        "<s>[INST] Be brief.\n\nHi [/INST]")
    for template in (LLAMA3, MISTRAL):
        prompt = template.render_text(TOOL_CONVERSATION, [WEATHER])
        assert HERMES_TOOLS in prompt
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}' in prompt
        assert "<tool_response>\n25\n</tool_response>" in prompt


# --- learning the server's template ----------------------------------------------------------

class RenderingServer(FakeBackend):
    """A server whose template is ``render`` (messages, tools -> prompt); its renderings of
    the probe conversations fail ``fail_probes`` times first."""

    def __init__(self, render: Any, *, fail_probes: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.render = render
        self.fail_probes = fail_probes

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None) -> str | None:
        await super().render_chat(messages, tools, tool_choice=tool_choice)
        if self.fail_probes and "Probe:" in str(messages[0]["content"]):
            self.fail_probes -= 1
            raise BackendError("500 on /chat_tokenize", url=self.url)
        rendered: str = self.render(messages, tools)
        return rendered


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."}, *HI,
    {"role": "assistant", "content": "<think>\nGreeting.\n</think>\n\nHello!"},
    {"role": "user", "content": "What is 2 + 2?"}]


def with_default_system(messages: Sequence[dict[str, Any]], tools: Any) -> str:
    """Qwen2.5's template: ChatML with "You are Qwen, ..." where the caller sent no system."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": "You are Qwen, a helpful assistant."},
                    *messages]
    return CHATML.render_text(messages, tools)


@pytest.mark.parametrize(("server", "learnt"), [
    (lambda m, t: CHATML.render_text(m, t), "chatml"),
    (lambda m, t: DEEPSEEK_R1.render_text(m, t), "deepseek-r1"),
    (lambda m, t: LLAMA3.render_text(m, t), "llama3"),
    (lambda m, t: MISTRAL.render_text(m, t), "mistral"),
    (lambda m, t: CHATML.render_text(m, t) + "<think>\n", "chatml"),
    (with_default_system, "chatml with its default system prompt"),
])
async def test_a_server_template_a_built_in_reproduces_is_learnt(server: Any,
                                                                 learnt: str) -> None:
    """The first conversation renders on the server beside two probes; every later one without
    tools renders client-side, exactly as the server would have (broken: a render round trip
    per conversation, or a prompt the server would not have written)."""
    backend = RenderingServer(server)
    auto = AutoTemplate()

    first = await render_prompt(auto, HI, None, backend)
    asked = len(backend.calls)
    later = await render_prompt(auto, CONVERSATION, None, backend)

    assert first == server(HI, None)
    assert asked == 3  # its own rendering and the two probes
    assert later == server(validate_messages(CONVERSATION), None)
    assert len(backend.calls) == asked  # the later conversation asked nothing
    learned = auto.learnt(backend)
    assert learned is not None and learned.name == learnt


@pytest.mark.parametrize("server", [
    # Llama 3.1's template writes today's date into the system turn.
    lambda m, t: "Today Date: 2 Dec 2026\n" + LLAMA3.render_text(m, t),
    # Qwen3's hybrid template drops earlier reasoning as R1's does, in ChatML turns.
    lambda m, t: CHATML.render_text([{**x, "content": x["content"].split("</think>")[-1]}
                                     for x in m], t),
    # A template that trims every message, as Llama 3's Hub template does.
    lambda m, t: CHATML.render_text([{**x, "content": x["content"].strip()} for x in m], t),
])
async def test_a_server_template_no_built_in_reproduces_stays_on_the_server(
        server: Any) -> None:
    """A template that differs from every built-in anywhere the probes look is never guessed:
    every conversation renders on the server (broken: a near match was adopted and the model
    got prompts its server would not have written)."""
    backend = RenderingServer(server)
    auto = AutoTemplate()

    await render_prompt(auto, HI, None, backend)
    later = await render_prompt(auto, CONVERSATION, None, backend)

    assert later == server(validate_messages(CONVERSATION), None)
    assert auto.learnt(backend) is None
    assert len(backend.calls) == 4  # three at first, then one per conversation, no new probe


async def test_tools_render_on_the_server_after_the_template_is_learnt() -> None:
    """The server adds its own tool prompt (TGI's), so a learnt template never writes tools."""
    backend = RenderingServer(lambda m, t: "[server with tools]" if t else CHATML.render_text(m))
    auto = AutoTemplate()
    await render_prompt(auto, HI, None, backend)

    prompt = await render_prompt(auto, HI, [CLOCK], backend)

    assert prompt == "[server with tools]"
    assert auto.learnt(backend) is not None
    assert len(backend.calls) == 4


async def test_learning_off_renders_every_conversation_on_the_server() -> None:
    backend = RenderingServer(lambda m, t: CHATML.render_text(m, t))
    auto = resolve_template(AutoTemplate(learn=False))

    for _ in range(3):
        await render_prompt(auto, HI, None, backend)

    assert len(backend.calls) == 3
    assert repr(auto) == "AutoTemplate(learn=False)"


async def test_a_failed_probe_never_fails_the_call_and_is_tried_again_a_few_times() -> None:
    """A server error on a probe leaves the conversation rendered by the server and learning
    for a later one; after three failures it stops probing (broken: an optional probe failed a
    user's call, or a failing server got two extra requests per conversation forever)."""
    backend = RenderingServer(lambda m, t: CHATML.render_text(m, t), fail_probes=100)
    auto = AutoTemplate()

    prompts = [await render_prompt(auto, HI, None, backend) for _ in range(5)]

    assert set(prompts) == {CHATML.render_text(HI)}
    assert auto.learnt(backend) is None
    assert len(backend.calls) == 3 * 3 + 2  # three attempts with two probes each, then one


async def test_conversations_during_the_first_ones_probes_wait_for_its_learning() -> None:
    """A burst arriving cold: one conversation renders on the server beside the probes, the
    others wait for that one learning and render client-side (issue 22: broken when each
    renders on the server, or probes of its own)."""
    backend = RenderingServer(lambda m, t: CHATML.render_text(m, t))
    auto = AutoTemplate()

    prompts = await asyncio.gather(*(render_prompt(auto, HI, None, backend) for _ in range(8)))

    assert set(prompts) == {CHATML.render_text(HI)}
    assert len(backend.calls) == 1 + 2
    assert auto.learnt(backend) is not None


@pytest.mark.parametrize("flavor", ["tgi", "vllm", "llamacpp"])
@pytest.mark.parametrize("model_id", [
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Qwen/QwQ-32B", "Qwen/Qwen2.5-7B-Instruct",
    "meta-llama/Llama-3.1-8B-Instruct"])
async def test_the_template_is_learnt_on_every_server_that_renders_one(flavor: Flavor,
                                                                       model_id: str) -> None:
    """TGI's /chat_tokenize (BOS kept), vLLM's /tokenize and llama.cpp's /apply-template (BOS
    left out): after the first conversation, later prompts are what the server itself renders,
    with no render request (broken: a per-conversation round trip on one server kind, or a
    BOS sent twice or not at all)."""
    with LoopbackServer(EchoModel(), model_id=model_id, flavor=flavor) as server:
        backend = create("tgi" if flavor == "tgi" else "openai", server.url)
        try:
            auto = AutoTemplate()
            await render_prompt(auto, HI, None, backend)
            asked = len(server.calls)
            later = await render_prompt(auto, CONVERSATION, None, backend)
            rendered_on_the_server = await render_prompt(
                AutoTemplate(learn=False), CONVERSATION, None, backend)
        finally:
            await backend.aclose()
        assert auto.learnt(backend) is not None
        assert len(server.calls) > asked  # the server rendering did ask...
        assert [call.path for call in server.calls[:asked]].count("/info") <= 1
        assert later == rendered_on_the_server
        assert server.calls[asked].path != "/generate_stream"
