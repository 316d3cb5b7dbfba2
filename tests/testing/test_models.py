"""``ThinkingModel``: a reasoning model that behaves as DeepSeek-R1 or Qwen3 thinking models do
under their own templates, and as a ChatML reasoning model under ChatML.

If these fail, the reasoning-split matrices (tests/lc, tests/li) test the adapters against a
model no real server runs."""

from __future__ import annotations

from specthink.testing import ThinkingModel

CHATML = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
R1 = "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n"
QWEN3 = CHATML + "<think>\n"


def model(reasoning: str = "Two and two.\n\nWait, yes: four.") -> ThinkingModel:
    seen: list[str] = []

    def think(conversation: str) -> tuple[str, str]:
        seen.append(conversation)
        return reasoning, "Four."
    found = ThinkingModel(think)
    found.seen = seen  # type: ignore[attr-defined]
    return found


def test_it_opens_the_reasoning_only_where_the_prompt_did_not() -> None:
    thinking = model()
    assert thinking.continuation(CHATML).text == (
        "<think>\nTwo and two.\n\nWait, yes: four.\n</think>\n\nFour.")
    assert thinking.continuation(R1).text == "Two and two.\n\nWait, yes: four.\n</think>\n\nFour."
    assert thinking.continuation(QWEN3).text == thinking.continuation(R1).text


def test_it_resumes_from_text_either_model_wrote() -> None:
    """A takeover changes the author of a passage, not its words."""
    thinking = model()
    assert thinking.continuation(R1 + "Two and two.\n\nWait,").text == (
        " yes: four.\n</think>\n\nFour.")
    assert thinking.continuation(CHATML + "<think>\nTwo").text == (
        " and two.\n\nWait, yes: four.\n</think>\n\nFour.")
    stopped = thinking.continuation(R1 + "Five")
    assert stopped.text == "" and stopped.eos


def test_think_sees_the_conversation_before_the_generation_prompt() -> None:
    thinking = model()
    thinking.continuation(R1 + "Two")
    assert thinking.seen == ["<｜begin▁of▁sentence｜><｜User｜>2+2?"]  # type: ignore[attr-defined]


def test_without_reasoning_an_opened_block_is_closed_first() -> None:
    thinking = model(reasoning="")
    assert thinking.continuation(CHATML).text == "Four."
    assert thinking.continuation(R1).text == "</think>\n\nFour."


def test_a_model_trained_under_an_opening_template_never_writes_the_tag() -> None:
    """QwQ and Qwen3 thinking checkpoints: under ChatML their reasoning arrives untagged."""
    thinking = ThinkingModel(lambda c: ("Two and two.", "Four."), writes_start=False)
    assert thinking.continuation(CHATML).text == "Two and two.\n</think>\n\nFour."
    assert thinking.continuation(QWEN3).text == "Two and two.\n</think>\n\nFour."
    assert thinking.continuation(CHATML + "Two and").text == " two.\n</think>\n\nFour."
