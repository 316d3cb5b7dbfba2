"""What the LangChain and LlamaIndex reasoning matrices share: the model ids, the reasoning
script's text, the server and template cases, and loopback pairs started on first use.

Each server pair reports real model ids (the paper's DeepSeek-R1-Distill-Qwen 1.5B + 32B, a
Qwen3 thinking pair, a Qwen2.5 ChatML pair) and renders with that family's template, as TGI,
vLLM and llama.cpp do. The model is one reasoning script, written as each family writes it:
the R1 distills and Qwen3 thinking models were trained under templates that open ``<think>``
and never write the tag themselves (under any other template their reasoning arrives untagged);
the ChatML model writes it. Its reasoning says "Wait" after a blank line, so the target takes over
mid-reasoning and the split holds across authors; where tools are offered it drafts a decoy
``<tool_call>`` while thinking, which must never be executed.

The script as a function of the conversation is :func:`think`; an adapter's module that scripts
more conversations (LangChain's structured output) answers those and leaves the rest to it, and
asks :func:`loopback_pairs` for its servers. :func:`assert_prompt` checks what the small model
was sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple

from specthink.testing import LoopbackServer, ThinkingModel

R1 = ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")
QWEN3 = ("Qwen/Qwen3-4B-Thinking-2507", "Qwen/QwQ-32B")
CHATML = ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-32B-Instruct")
R1_BOS = "<｜begin▁of▁sentence｜>"

QWEN3_THINKING = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
"""A Qwen3-thinking-style Jinja template the user passes: its generation prompt opens the
reasoning."""


# ---- the model's script ------------------------------------------------------------------

QUESTION = "What is 12 * 13?"
REASONING = "12 * 13 = 120 + 36.\n\nWait, let me check: 120 + 36 = 156."
ANSWER = "12 * 13 = 156."


def call(city: str, travellers: int) -> str:
    arguments = {"city": city, "travellers": travellers}
    return ("<tool_call>\n" + json.dumps({"name": "get_ticket_price", "arguments": arguments})
            + "\n</tool_call>")


DECOY = call("Oslo", 4)
"""Drafted inside the reasoning only: executing it is the bug."""
TICKETS = "How much are train tickets to Bergen for two?"
WALK = "Do I need a ticket to walk around Bergen?"
TICKETS_REASONING = ("The user wants a price.\n\nWait, maybe Oslo first:\n" + DECOY
                     + "\n\nNo, the question is about Bergen, for two travellers.")
WALK_REASONING = ("Walking is free.\n\nWait, should I look up a price anyway?\n" + DECOY
                  + "\n\nNo, there is nothing to buy.")
WALK_ANSWER = "No, walking around Bergen needs no ticket."
PRICED_REASONING = ("The tool answered 240 NOK.\n\nWait, call it again to be sure?\n" + DECOY
                    + "\n\nNo, one answer is enough.")
PRICED_ANSWER = "Two train tickets to Bergen cost 240 NOK."


class Server(NamedTuple):
    flavor: Literal["tgi", "vllm", "llamacpp", "llama-cpp-python"]
    """Whose endpoints the loopback pair speaks."""
    models: tuple[str, str]
    """The small and target model ids; each server renders with its family's template."""

    @property
    def backend(self) -> Literal["tgi", "openai"]:
        return "tgi" if self.flavor == "tgi" else "openai"


class Case(NamedTuple):
    server: Server
    template: str
    """``small_template`` / ``target_template``: "auto" is the server's own rendering."""
    opens_reasoning: bool
    """The prompt sent ends inside ``<think>``, so the output starts in the reasoning."""


CASES = {
    # the server's own template (or, where the server renders none, the family's by model id)
    "tgi-r1-server": Case(Server("tgi", R1), "auto", True),
    "vllm-r1-server": Case(Server("vllm", R1), "auto", True),
    "llamacpp-r1-server": Case(Server("llamacpp", R1), "auto", True),
    "llama-cpp-python-r1-family": Case(Server("llama-cpp-python", R1), "auto", True),
    "llama-cpp-python-qwen3-family": Case(Server("llama-cpp-python", QWEN3), "auto", True),
    "tgi-qwen3-server": Case(Server("tgi", QWEN3), "auto", True),
    "vllm-qwen3-server": Case(Server("vllm", QWEN3), "auto", True),
    # a template the user names, rendered client-side
    "tgi-r1-builtin": Case(Server("tgi", R1), "deepseek-r1", True),
    "vllm-r1-builtin": Case(Server("vllm", R1), "deepseek-r1", True),
    "tgi-chatml": Case(Server("tgi", CHATML), "chatml", False),
    "vllm-chatml": Case(Server("vllm", CHATML), "chatml", False),
    "tgi-qwen3-jinja": Case(Server("tgi", QWEN3), QWEN3_THINKING, True),
    "vllm-qwen3-jinja": Case(Server("vllm", QWEN3), QWEN3_THINKING, True),
}
TOOL_CASES = ["tgi-r1-server", "vllm-r1-server", "llamacpp-r1-server",
              "llama-cpp-python-r1-family", "llama-cpp-python-qwen3-family",
              "tgi-qwen3-server", "vllm-qwen3-server",
              "tgi-chatml", "vllm-chatml"]
"""Cases whose templates render tools (a user's plain Jinja template may not)."""


class Pair(NamedTuple):
    small: LoopbackServer
    target: LoopbackServer


PRICED = re.compile(r"<tool_response>\s*240 NOK")
"""The conversation holds the price tool's answer."""


def think(conversation: str) -> tuple[str, str]:
    """The whole output for a conversation: (reasoning, answer)."""
    if PRICED.search(conversation):
        return PRICED_REASONING, PRICED_ANSWER
    if WALK in conversation:
        return WALK_REASONING, WALK_ANSWER
    if TICKETS in conversation:
        return TICKETS_REASONING, call("Bergen", 2)
    if QUESTION in conversation:
        return REASONING, ANSWER
    return "", "I have no script for this."


def assert_prompt(case: Case, pair: Pair) -> None:
    """The small model saw the template the case names, once-BOS, and the target took over."""
    first = pair.small.records[0]
    assert first.prompt.endswith("<think>\n") is case.opens_reasoning, first.prompt
    assert not first.model_input.startswith(R1_BOS * 2)
    assert pair.target.records, "no takeover: the split was not tested across authors"


def loopback_pairs(think: Callable[[str], tuple[str, str]],
                   ) -> Iterator[Callable[[Server], Pair]]:
    """One loopback pair per flavour and model family, started on first use (each server
    renders with its family's template; ``think`` writes as that family writes)."""
    started: dict[Server, Pair] = {}

    def pair(server: Server) -> Pair:
        if server not in started:
            model = ThinkingModel(think, writes_start=server.models == CHATML)
            small, target = (LoopbackServer(model, model_id=model_id, flavor=server.flavor)
                             for model_id in server.models)
            started[server] = Pair(small.start(), target.start())
        found = started[server]
        found.small.reset()
        found.target.reset()
        return found

    yield pair
    for found in started.values():
        found.small.stop()
        found.target.stop()
