"""The Responses event writer on its own (sans I/O): output shapes the loopback model does not
write (answer text before a call, a budget spent while reasoning), each event and the final
response parsed with the ``openai`` SDK's types."""

from __future__ import annotations

import json
from typing import Any, cast

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from specthink.output import FinalOutput, OutputDelta
from specthink.serve.responses import EventWriter, ResponsesCall, ResponsesRequest
from specthink.tools import ToolCall
from specthink.trace import Result, Statistics

EVENTS: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


def call(**fields: Any) -> ResponsesCall:
    request = ResponsesRequest.model_validate({"model": "specthink", "input": "x", **fields})
    # The writer reads only the request and the ids; the engine call is not needed.
    return ResponsesCall(chat=cast(Any, None), request=request, input_items=[], store=False)


def events_of(data: bytes) -> list[dict[str, Any]]:
    events = []
    for block in data.decode().split("\n\n"):
        if block:
            name, payload = block.split("\n")
            event = json.loads(payload.removeprefix("data: "))
            assert name == f"event: {event['type']}"
            EVENTS.validate_python(event)
            events.append(event)
    return events


def result(finish_reason: str) -> Result:
    return Result(text="", events=(), stats=Statistics(small_tokens=5, reasoning_tokens=3,
                                                       input_tokens=4,
                                                       finish_reason=finish_reason))


def test_answer_text_then_a_call_are_a_message_then_a_function_call() -> None:
    """Text the model wrote before its call is a message item; the call follows with its
    arguments streamed; status completed. Failing: the text is lost or the items misordered."""
    writer = EventWriter(call(tools=[{"type": "function", "name": "get_weather"}]))
    data = writer.start()
    data += writer.piece(OutputDelta("reasoning", "Check."))
    data += writer.piece(OutputDelta("answer", "Looking"))
    weather = ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"})
    data += writer.finish(FinalOutput(deltas=[], rest=" it up.", reasoning="Check.",
                                      answer="Looking it up.", tool_calls=[weather]),
                          result("stop"))
    events = events_of(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.completed" and final.status == "completed"
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == "Looking it up."
    function = final.output[2]
    assert function.type == "function_call" and function.call_id == "call_1"
    assert json.loads(function.arguments) == {"city": "Paris"}
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [0, 1, 2]
    assert writer.final == events[-1]["response"]


def test_budget_spent_while_reasoning_is_incomplete_with_an_empty_answer() -> None:
    """The budget ends the output inside the reasoning: response.incomplete, reason
    max_output_tokens, the reasoning item and an empty, incomplete message (so clients that
    read output_text get "" rather than an error)."""
    writer = EventWriter(call(max_output_tokens=5))
    data = writer.start() + writer.piece(OutputDelta("reasoning", "Let me"))
    data += writer.finish(FinalOutput(deltas=[OutputDelta("reasoning", " see")], rest="",
                                      reasoning="Let me see", answer=""), result("length"))
    events = events_of(data)
    final = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert [(item.type, item.status) for item in final.output] == [
        ("reasoning", "completed"), ("message", "incomplete")]
    assert final.output_text == ""
    done = next(e for e in events if e["type"] == "response.reasoning_text.done")
    assert done["text"] == "Let me see"


def test_failed_carries_what_was_finished_and_the_error() -> None:
    from specthink.serve.errors import APIError

    writer = EventWriter(call())
    data = writer.start() + writer.piece(OutputDelta("reasoning", "Hm"))
    data += writer.error(APIError(502, "the target model server failed")) + writer.done()
    event = events_of(data)[-1]
    failed = Response.model_validate(event["response"])
    assert event["type"] == "response.failed" and failed.status == "failed"
    assert failed.error is not None and failed.error.code == "server_error"
    assert "target model server" in failed.error.message
