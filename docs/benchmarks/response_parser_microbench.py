"""CPU cost per streamed token of reading a model's output: the splitter specthink had (fixed
``<think>`` + Hermes tags), its response-template executor and the splitter built on it, and
transformers' streaming ``ResponseParser`` on the same templates. docs/architecture.md
("Response templates: which executor, measured") holds the figures.

    PYTHONPATH=<tree> python docs/benchmarks/response_parser_microbench.py

A long reasoning trace (8,000 reasoning tokens, 32,000 in the last rows; a 500-token answer and
a call), fed one token at a time; CPU microseconds per token, best of 5 (process time).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from specthink.formats.families import builtin_template
from specthink.formats.response_template import ResponseParser
from specthink.formats.splitting import TemplateSplitter
from specthink.output import OutputSplitter
from specthink.trace import StartEvent, TextEvent

WORDS = "wait so the answer is maybe let me check again hmm alternatively we compute".split()


def trace(reasoning_end: str, answer_start: str, call: str, length: int = 8000) -> list[str]:
    rng = random.Random(1)
    tokens = []
    for i in range(length):
        tokens.append(" " + rng.choice(WORDS))
        if i % 50 == 0:
            tokens.append(".\n\n")
    tokens += ["\n", reasoning_end, answer_start]
    tokens += [" " + rng.choice(WORDS) for _ in range(500)]
    return [*tokens, call]


HERMES = trace("</think>", "\n\n", '\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
                                   "</tool_call>")
HARMONY = trace("<|end|>", "<|start|>assistant<|channel|>final<|message|>", "<|return|>")
HERMES_32K = trace("</think>", "\n\n", '\n<tool_call>\n{"name": "f", "arguments": {}}\n'
                                       "</tool_call>", length=32000)
XML = trace("</think>", "\n\n", "\n<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n"
                                "</function>\n</tool_call>")


def cost(run: Callable[[list[str]], object], tokens: list[str]) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        run(tokens)
        best = min(best, time.process_time() - start)
    return best / len(tokens) * 1e6


def old_splitter(tokens: list[str]) -> object:
    splitter = OutputSplitter(tools=["f"])
    splitter.feed(StartEvent(starts_in_reasoning=True))
    for token in tokens:
        splitter.feed(TextEvent("small", token))
    return splitter.finish()


def ours(name: str, prefix: str) -> Callable[[list[str]], object]:
    template = builtin_template(name)

    def run(tokens: list[str]) -> object:
        parser = ResponseParser(template, prefix)
        for token in tokens:
            parser.feed(token)
        return parser.finalize()
    return run


def splitter(name: str, prefix: str) -> Callable[[list[str]], object]:
    template = builtin_template(name)

    def run(tokens: list[str]) -> object:
        split = TemplateSplitter(template, prefix, tools=["f"])
        for token in tokens:
            split.feed(token)
        return split.finish()
    return run


def theirs(name: str, prefix: str) -> Callable[[list[str]], object]:
    from transformers.utils.chat_parsing import ResponseParser as TransformersParser
    spec = dict(builtin_template(name).spec)

    def run(tokens: list[str]) -> object:
        parser = TransformersParser(spec, prefix=prefix)
        for token in tokens:
            parser.feed(token)
        return parser.finalize()
    return run


def main() -> None:
    start = time.perf_counter()
    import transformers.utils.chat_parsing  # noqa: F401 - the import's own cost, once
    print(f"import transformers.utils.chat_parsing: {time.perf_counter() - start:.2f} s wall")
    rows = [
        ("<think> + Hermes: OutputSplitter (before)", old_splitter, HERMES),
        ("<think> + Hermes: specthink executor, qwen3", ours("qwen3", "<think>\n"), HERMES),
        ("<think> + Hermes: transformers ResponseParser", theirs("qwen3", "<think>\n"), HERMES),
        ("<think> + Hermes: TemplateSplitter (replaces OutputSplitter)",
         splitter("qwen3", "<think>\n"), HERMES),
        ("<think> + XML calls: specthink executor", ours("qwen3-xml", "<think>\n"), XML),
        ("<think> + XML calls: transformers ResponseParser", theirs("qwen3-xml", "<think>\n"),
         XML),
        ("harmony: specthink executor, gpt-oss",
         ours("gpt-oss", "<|channel|>analysis<|message|>"), HARMONY),
        ("harmony: transformers ResponseParser",
         theirs("gpt-oss", "<|channel|>analysis<|message|>"), HARMONY),
        ("32k-token trace: OutputSplitter (before)", old_splitter, HERMES_32K),
        ("32k-token trace: specthink executor", ours("qwen3", "<think>\n"), HERMES_32K),
        ("32k-token trace: transformers ResponseParser", theirs("qwen3", "<think>\n"),
         HERMES_32K),
    ]
    for label, run, tokens in rows:
        print(f"{label:62s} {cost(run, tokens):6.2f} us/token")


if __name__ == "__main__":
    main()
