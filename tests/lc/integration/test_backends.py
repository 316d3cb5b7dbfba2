"""``ChatSpeculativeThinking(backend=...)``: every wire protocol the factory knows, Ollama's
answering over loopback (``tests.ollama_support``), and a bad one refused before any request."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from specthink.backends import kinds
from specthink.backends._factory import backend_class
from specthink.backends.ollama import OllamaBackend
from specthink_lc import ChatSpeculativeThinking
from tests.ollama_support import ANSWER, MODELS, Ollama


@pytest.mark.parametrize("kind", kinds())
def test_every_kind_of_the_factory_is_a_backend(kind: str) -> None:
    """Broken: the adapter keeps its own list of protocols, so one that
    ``specthink.backends.create`` builds (``ollama``) is refused, or the wrong class is built."""
    model = ChatSpeculativeThinking(small_url="http://127.0.0.1:1",
                                    target_url="http://127.0.0.1:2", backend=kind)
    small, target = model._build_backends()
    assert isinstance(small, backend_class(kind)) and isinstance(target, backend_class(kind))


def test_it_answers_over_ollama(ollama: Ollama) -> None:
    """Broken: ``backend="ollama"`` is refused, or the model names do not reach the servers."""
    model = ChatSpeculativeThinking(small_url=ollama.url, target_url=ollama.url,
                                    backend="ollama", small_model=MODELS[1],
                                    target_model=MODELS[0], small_template="chatml",
                                    target_template="chatml", max_tokens=16)
    try:
        message = model.invoke("Hi")
        small = model._get_thinker().small
    finally:
        model.close()
    assert message.content == ANSWER
    assert isinstance(small, OllamaBackend)
    assert ollama.models() == [MODELS[1]]


def test_an_unknown_kind_names_the_valid_ones() -> None:
    """Broken: a typo in ``backend`` fails at the first request, or the error does not say
    which protocols there are."""
    with pytest.raises(ValidationError, match=f"unknown backend kind 'grpc'; choose one of "
                                              f"{', '.join(kinds())}"):
        ChatSpeculativeThinking(small_url="http://127.0.0.1:1",
                                target_url="http://127.0.0.1:2", backend="grpc")
