"""The two wires of the "through ``specthink serve``" client: which event carries text, the
statistics and the end, and which is a failure. (A tiny run against a real server is in
``test_serve.py``.)"""

from __future__ import annotations

import orjson
import pytest

from benchmarks.serve_policy import CHAT, RESPONSES, Read

STATS = {"small_tokens": 3}


def _data(value: object) -> str:
    return orjson.dumps(value).decode()


def test_responses_text_comes_from_both_delta_kinds_and_the_end_from_the_terminal_event(
) -> None:
    """If this fails, the Responses row's first text, text or end is read from the wrong
    event (``response.created`` is not text; ``response.incomplete`` ends like chat's
    ``finish_reason: length``)."""
    read = RESPONSES.read
    assert read(_data({"type": "response.created", "response": {}})) == Read()
    assert read(_data({"type": "response.reasoning_text.delta", "delta": "Hm"})) \
        == Read("reasoning", "Hm")
    assert read(_data({"type": "response.output_text.delta", "delta": "42"})) \
        == Read("content", "42")
    assert read(_data({"type": "response.output_text.done", "text": "42"})) == Read()
    for end in ("response.completed", "response.incomplete"):
        assert read(_data({"type": end, "response": {"specthink": STATS}})) \
            == Read(stats=STATS, end=True)


def test_a_failed_response_or_chat_error_is_raised_with_its_message() -> None:
    """If this fails, a conversation the server failed would count as a measured one."""
    with pytest.raises(RuntimeError, match=r"response\.failed: engine down"):
        RESPONSES.read(_data({"type": "response.failed",
                              "response": {"error": {"message": "engine down"}}}))
    with pytest.raises(RuntimeError, match="engine down"):
        CHAT.read(_data({"error": {"message": "engine down"}}))


def test_chat_reads_reasoning_answer_statistics_and_done() -> None:
    """If this fails, the chat row reads its text, statistics or end differently than before
    the Responses row shared its code."""
    def chunk(delta: dict[str, str]) -> str:
        return _data({"choices": [{"index": 0, "delta": delta}]})

    assert CHAT.read(chunk({"role": "assistant", "content": ""})) == Read()
    assert CHAT.read(chunk({"reasoning_content": "Hm", "reasoning": "Hm"})) \
        == Read("reasoning", "Hm")
    assert CHAT.read(chunk({"content": "42"})) == Read("content", "42")
    assert CHAT.read(_data({"choices": [], "usage": {}, "specthink": STATS})) \
        == Read(stats=STATS)
    assert CHAT.read("[DONE]") == Read(end=True)
    assert RESPONSES.body([{"role": "user", "content": "q"}], 9)["input"] \
        == [{"role": "user", "content": "q"}]
