"""A LlamaIndex query engine over a few documents, answered by speculative thinking.

    python examples/li_query_engine.py "When does the Zembla parliament meet?"

``MockEmbedding`` stands in for an embedding model so the example needs no download; it gives
every text the same vector, so retrieval cannot rank and the engine retrieves all three
documents. Swap in a real embedding model (``Settings.embed_model = ...``) for real retrieval.
"""

from __future__ import annotations

import sys
from typing import Any

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding

from specthink_li import SpeculativeThinkingLLM

DOCUMENTS = [
    "Zembla is a small island nation in the northern sea. The capital of Zembla is Vrell.",
    "The national dish of Zembla is smoked herring with rye bread.",
    "The parliament of Zembla meets twice a year, in spring and in autumn, in a wooden hall.",
]


def main(small_url: str, target_url: str, question: str = "What is the capital of Zembla?",
         **options: Any) -> str:
    llm = SpeculativeThinkingLLM(small_url=small_url, target_url=target_url,
                                 temperature=0, max_tokens=512, **options)
    # The engine sizes its prompts from llm.metadata once: ask the servers for their limits first.
    meta = llm.fetch_metadata()
    print(f"models: {meta.model_name}, context window {meta.context_window} tokens")

    index = VectorStoreIndex.from_documents([Document(text=text) for text in DOCUMENTS],
                                            embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(llm=llm, similarity_top_k=len(DOCUMENTS))
    response = engine.query(question)
    print(f"answer: {response}")
    print(f"from {len(response.source_nodes)} retrieved passages")
    llm.close()
    return str(response)


if __name__ == "__main__":
    from server_settings import server_settings

    small, target, settings = server_settings()
    main(small, target, *sys.argv[1:2], **settings)
