"""Any OpenAI client against `specthink serve`: the reasoning and the answer, whole and streamed.

    specthink serve --small http://small:8080 --target http://target:8080 --api-key sk-local &
    SPECTHINK_SERVE_KEY=sk-local python examples/serve_openai.py "What is 12 * 13?"

The reasoning arrives in ``reasoning_content`` (and ``reasoning``), beside ``content``; the
server's statistics (who wrote how much, takeovers per rule) in the response's ``specthink``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from openai import OpenAI


def main(base_url: str, question: str = "What is 12 * 13?", *, api_key: str = "none",
         **options: Any) -> dict[str, Any]:
    with OpenAI(base_url=base_url, api_key=api_key, **options) as client:
        messages: Any = [{"role": "user", "content": question}]
        whole = client.chat.completions.create(model="specthink", messages=messages)
        message = whole.choices[0].message
        reasoning = (message.model_extra or {}).get("reasoning_content", "")
        stats = (whole.model_extra or {})["specthink"]
        print(f"reasoning: {reasoning.strip()}\nanswer: {message.content}")
        print(f"target share {stats['target_share']:.0%}, takeovers {stats['takeovers']}")
        streamed = []
        for chunk in client.chat.completions.create(model="specthink", messages=messages,
                                                    stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                streamed.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    return {"reasoning": reasoning, "answer": message.content, "streamed": "".join(streamed),
            "stats": stats}


if __name__ == "__main__":
    main(os.environ.get("SPECTHINK_SERVE_URL", "http://127.0.0.1:8000/v1"),
         *sys.argv[1:2], api_key=os.environ.get("SPECTHINK_SERVE_KEY", "none"))
