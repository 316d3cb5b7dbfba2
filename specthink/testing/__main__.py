"""Run a loopback server (TGI's protocol, or vLLM's, llama.cpp's, llama-cpp-python's) from a
shell::

    python -m specthink.testing --port 8080 --echo
    python -m specthink.testing --port 8080 --script answers.json --per-token 0.02
    python -m specthink.testing --port 8000 --echo --flavor vllm \
        --model-id deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B

A script file is a JSON list of scripts, each ``{"after": "", "text": "...", "eos": true}`` or
just the text to write from the start of the answer; or an object
``{"scripts": [...], "default": "text when no script matches"}``. See
:class:`specthink.testing.ScriptedModel`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specthink.testing._dialects import FLAVORS
from specthink.testing._templates import CHAT_TEMPLATES
from specthink.testing.models import EchoModel, Script, ScriptedModel, TextModel, Tokenizer
from specthink.testing.server import LatencyModel, LoopbackServer


def _script(entry: Any) -> Script:
    if isinstance(entry, str):
        return Script("", entry)
    if isinstance(entry, dict) and isinstance(entry.get("text"), str):
        return Script(str(entry.get("after", "")), entry["text"], bool(entry.get("eos", True)))
    raise ValueError(f"a script is a string or {{'after', 'text', 'eos'}}, got {entry!r}")


def load_model(path: Path) -> ScriptedModel:
    """A :class:`ScriptedModel` from a JSON script file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return ScriptedModel([_script(entry) for entry in data])
    if isinstance(data, dict) and isinstance(data.get("scripts"), list):
        return ScriptedModel([_script(entry) for entry in data["scripts"]],
                             default=str(data.get("default", "")))
    raise ValueError(f"{path}: expected a list of scripts or {{'scripts': [...]}}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m specthink.testing",
                                description="An inference server on loopback whose model is "
                                            "a script (or an echo of the last user message).")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--script", type=Path, metavar="FILE.json",
                       help="JSON scripts the model follows")
    model.add_argument("--echo", action="store_true",
                       help="answer with the last user message")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (default 8080)")
    p.add_argument("--model-id", default="specthink/scripted",
                   help="also picks the chat template: DeepSeek-R1, Qwen3, Llama 3, else ChatML")
    p.add_argument("--flavor", choices=FLAVORS, default="tgi",
                   help="whose endpoints to serve besides /v1/completions (default tgi)")
    p.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATES), default=None,
                   help="the served model's template, instead of the one the model id implies")
    p.add_argument("--max-input-tokens", type=int, default=4096)
    p.add_argument("--max-total-tokens", type=int, default=8192)
    p.add_argument("--split-newlines", action="store_true",
                   help='make every newline its own token (so "\\n\\n" spans two tokens)')
    p.add_argument("--per-request", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--per-uncached-prompt-token", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--per-token", type=float, default=0.0, metavar="SECONDS")
    return p


def build_server(args: argparse.Namespace) -> LoopbackServer:
    model: TextModel = EchoModel() if args.echo else load_model(args.script)
    return LoopbackServer(
        model, tokenizer=Tokenizer(split_newlines=args.split_newlines),
        latency=LatencyModel(per_request=args.per_request,
                             per_uncached_prompt_token=args.per_uncached_prompt_token,
                             per_token=args.per_token),
        model_id=args.model_id, max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens, host=args.host, port=args.port,
        flavor=args.flavor, chat_template=args.chat_template)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        server = build_server(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server.start()
    print(f"specthink loopback server on {server.url} (Ctrl+C stops it)", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
