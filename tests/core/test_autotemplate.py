"""``specthink.autotemplate``: what learning a server's template leaves behind on the event
loop, and how calls share one learning (the counts per server are in
``tests/reliability/test_first_requests.py`` and ``tests/core/test_prompts.py``)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from specthink import SpeculativeThinker
from specthink.autotemplate import LEARNING_ATTEMPTS, AutoTemplate, ServerKnowledge
from specthink.backends import create
from specthink.backends.base import ServerInfo
from specthink.errors import BackendError
from specthink.prompts import CHATML, render_prompt
from specthink.testing.models import EchoModel
from specthink.testing.server import LoopbackServer

HI: list[dict[str, Any]] = [{"role": "user", "content": "Hi"}]


@contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Everything asyncio reports to the running loop's exception handler meanwhile (an
    exception never retrieved, a task destroyed while pending), collected after a full
    garbage collection."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        yield reported
        gc.collect()
    finally:
        loop.set_exception_handler(None)


class BlockingServer:
    """A server whose renderings never answer (until cancelled); it counts them."""

    url = "http://127.0.0.1:1"
    adds_bos_token = False
    keeps_tool_turns = True

    def __init__(self) -> None:
        self.renderings = 0
        self.started = asyncio.Event()

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None) -> str | None:
        self.renderings += 1
        if self.renderings == 1 + 2:  # the call's own and both probes are under way
            self.started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def info(self) -> ServerInfo:
        return ServerInfo(model_id="Qwen/Qwen2.5-7B-Instruct")


class ProbeFailingServer:
    """A ChatML server whose probe renderings fail (a 500) and whose others answer after the
    probes have started."""

    url = "http://127.0.0.1:2"
    adds_bos_token = False
    keeps_tool_turns = True

    def __init__(self) -> None:
        self.renderings = 0

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None) -> str | None:
        self.renderings += 1
        await asyncio.sleep(0)
        if "Probe:" in str(messages[0]["content"]) or messages[0]["role"] == "system":
            raise BackendError("500 on /chat_tokenize", url=self.url)
        return CHATML.render_text(messages, tools)

    async def info(self) -> ServerInfo:
        return ServerInfo(model_id="Qwen/Qwen2.5-7B-Instruct")


async def test_a_first_call_cancelled_while_learning_leaves_nothing_unretrieved() -> None:
    """A caller that gives up during the first rendering (a client hang-up, a timeout) ends
    the probes with it, and asyncio has nothing to report (broken: "_GatheringFuture exception
    was never retrieved ... CancelledError", printed for every such call)."""
    backend = BlockingServer()
    auto = AutoTemplate()
    with loop_errors() as reported:
        call = asyncio.ensure_future(render_prompt(auto, HI, None, backend))
        await backend.started.wait()
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        assert call.cancelled()
        del call  # its traceback holds the frames that held the probes
        await asyncio.sleep(0.01)  # the probes finish cancelling
    assert reported == []
    record = auto.knowledge(backend)
    assert record is not None and record.learning is None and not record.known


async def test_a_warm_up_on_servers_that_render_nothing_leaves_nothing_unretrieved() -> None:
    """``specthink serve`` warms up at start (and a first LangChain call does the same):
    against llama-cpp-python, which renders no template, the probes are dropped at once and
    asyncio reports nothing (broken: the warning, twice, at every start)."""
    with LoopbackServer(EchoModel(), model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                        flavor="llama-cpp-python") as small, \
            LoopbackServer(EchoModel(), model_id="HuggingFaceTB/SmolLM2-360M-Instruct",
                           flavor="llama-cpp-python") as target:
        thinker = SpeculativeThinker(small=create("openai", small.url),
                                     target=create("openai", target.url))
        try:
            with loop_errors() as reported:
                await thinker.warm_up()
                await asyncio.sleep(0.05)  # the dropped probes finish cancelling
        finally:
            await thinker.aclose()
    assert reported == []


async def test_calls_waiting_for_a_failed_learning_render_on_the_server() -> None:
    """A cold burst waits for one learning; when its probes fail, every call still gets the
    server's rendering and none fails (broken: a waiter inherits the probe's error, or waits
    for good)."""
    backend = ProbeFailingServer()
    auto = AutoTemplate()
    with loop_errors() as reported:
        prompts = await asyncio.gather(*(render_prompt(auto, HI, None, backend)
                                         for _ in range(16)))
    assert prompts == [CHATML.render_text(HI)] * 16
    assert reported == []
    record = auto.knowledge(backend)
    assert isinstance(record, ServerKnowledge)
    assert record.learnt is None and not record.known and record.learning is None
    assert 1 <= record.attempts <= LEARNING_ATTEMPTS


class ChatMLServer(ProbeFailingServer):
    """A ChatML server that renders everything."""

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None) -> str | None:
        self.renderings += 1
        return CHATML.render_text(messages, tools)


def test_a_learning_whose_loop_closed_does_not_block_the_next_one() -> None:
    """An event loop closed in the middle of a learning (a script's ``asyncio.run`` torn down)
    never ends that learning; the next loop's first call learns anew (broken: the backend
    renders on the server for good)."""
    backend = ChatMLServer()
    auto = AutoTemplate()
    record = auto.knowledge(backend)
    assert record is not None
    gone = asyncio.new_event_loop()
    record.learning = gone.create_future()
    gone.close()

    first = asyncio.run(render_prompt(auto, HI, None, backend))
    later = asyncio.run(render_prompt(auto, HI, None, backend))

    assert first == later == CHATML.render_text(HI)
    assert auto.learnt(backend) is not None
    assert backend.renderings == 1 + 2


class GatedChatMLServer(ChatMLServer):
    """A ChatML server whose renderings wait for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None) -> str | None:
        await self.gate.wait()
        return await super().render_chat(messages, tools, tool_choice=tool_choice)


async def test_a_waiter_cancelled_during_the_learning_cancels_no_one_else() -> None:
    """Of three calls arriving cold, the second gives up while the first learns: the learning
    and the third call's wait go on, and the third renders client-side (broken: the cancelled
    waiter cancelled the shared learning, and everyone fell back to the server)."""
    backend = GatedChatMLServer()
    auto = AutoTemplate()
    with loop_errors() as reported:
        learner, quitter, waiter = (asyncio.ensure_future(render_prompt(auto, HI, None, backend))
                                    for _ in range(3))
        await asyncio.sleep(0.01)  # all three are under way: one learning, two waiting
        quitter.cancel()
        await asyncio.gather(quitter, return_exceptions=True)
        backend.gate.set()
        prompts = await asyncio.gather(learner, waiter)
        assert quitter.cancelled()
        del quitter
    assert prompts == [CHATML.render_text(HI)] * 2
    assert backend.renderings == 1 + 2  # the learner's own and the probes; the waiter's none
    assert auto.learnt(backend) is not None
    assert reported == []
