"""Structured output: the answer as a pydantic object.

    python examples/lc_structured.py

``with_structured_output`` forces a tool call whose arguments are the object (the default
``method="function_calling"``); ``method="json_schema"`` puts the schema in the system prompt
(and into a TGI grammar when both servers take one). ``include_raw=True`` keeps the message, so
the speculative-thinking statistics are still at hand and a parsing error is returned, not
raised.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel, Field

from specthink_lc import ChatSpeculativeThinking


class WeatherReport(BaseModel):
    """A weather report extracted from a sentence."""

    city: str = Field(description="the city the report is about")
    temperature_c: int = Field(description="the temperature in degrees Celsius")


def main(small_url: str, target_url: str,
         text: str = "Lyon is at 21 degrees this afternoon, with a light breeze.",
         **options: Any) -> WeatherReport | None:
    model = ChatSpeculativeThinking(small_url=small_url, target_url=target_url,
                                    temperature=0, max_tokens=512, **options)
    extractor = model.with_structured_output(WeatherReport, include_raw=True)
    result = extractor.invoke(f"Extract the weather report from: {text}")
    model.close()
    assert isinstance(result, dict)
    if result["parsing_error"] is not None or result["parsed"] is None:
        print(f"no report: {result['parsing_error']}; the model said {result['raw'].text!r}")
        return None
    report: WeatherReport = result["parsed"]
    stats = result["raw"].response_metadata["speculative_thinking"]
    print(report)
    print(f"target share {stats['target_share']:.0%}, takeovers {stats['takeovers']}")
    return report


if __name__ == "__main__":
    from server_settings import server_settings

    small, target, settings = server_settings()
    main(small, target, *sys.argv[1:2], **settings)
