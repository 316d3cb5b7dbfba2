"""An LCEL chain: prompt | ChatSpeculativeThinking | StrOutputParser.

    python examples/lc_chain.py "Why is the sky blue?"
"""

from __future__ import annotations

import sys
from typing import Any

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from specthink_lc import ChatSpeculativeThinking


def main(small_url: str, target_url: str, question: str = "What is 12 * 13?",
         **options: Any) -> str:
    model = ChatSpeculativeThinking(small_url=small_url, target_url=target_url,
                                    temperature=0, max_tokens=512, **options)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "You are a careful assistant. Think step by step, then answer briefly."),
        ("human", "{question}"),
    ])
    chain = prompt | model | StrOutputParser()
    # The parser keeps the answer; the reasoning stays in the message's reasoning content.
    answer = chain.invoke({"question": question})
    print(answer)
    model.close()
    return answer


if __name__ == "__main__":
    from server_settings import server_settings

    small, target, settings = server_settings()
    main(small, target, *sys.argv[1:2], **settings)
