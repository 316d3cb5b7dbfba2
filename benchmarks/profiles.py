"""Latency models resembling real GPU servers, with the published figures they come from.

Each profile is the loopback server's :class:`~specthink.testing.server.LatencyModel` at full
speed (``scale=1``): a cost per request, per prompt token the prefix cache does not hold, and per
generated token. ``docs/benchmarks/methodology.md`` shows the arithmetic behind every number.
"""

from __future__ import annotations

from dataclasses import dataclass

from specthink.testing.server import LatencyModel

__all__ = ["SMALL_1_5B_A100", "TARGET_32B_A100", "GPUProfile"]


@dataclass(frozen=True, slots=True)
class GPUProfile:
    """One model on one GPU, as seconds per request, per uncached prompt token and per token."""

    name: str
    per_request: float
    per_uncached_prompt_token: float
    per_token: float
    source: str
    """Where the numbers come from (shown in the report)."""

    def latency(self, scale: float = 1.0) -> LatencyModel:
        """The server's latency model with every cost multiplied by ``scale``."""
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        return LatencyModel(per_request=self.per_request * scale,
                            per_uncached_prompt_token=self.per_uncached_prompt_token * scale,
                            per_token=self.per_token * scale)

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.per_token if self.per_token else float("inf")


# Decode: Qwen2.5 speed benchmark (vLLM 0.6.3, one A100 80GB, BF16, batch 1, input length 1):
# Qwen2.5-1.5B-Instruct 183.33 tokens/s. The R1 distill has the Qwen2.5-1.5B architecture.
# Prefill and per-request cost: vLLM on one A100 serving Qwen3-1.7B at concurrency 1
# (tenstorrent/tt-inference-server issue 340): TTFT 11.4 ms at 128 input tokens and 30.9 ms at
# 2048, i.e. (30.9 - 11.4) / 1920 = 10.2 us per prompt token; what is left of the 128-token TTFT
# once its prefill (1.3 ms) and the first decode step (5.45 ms) are taken out is ~4.6 ms.
SMALL_1_5B_A100 = GPUProfile(
    name="DeepSeek-R1-Distill-Qwen-1.5B, vLLM, 1x A100 80GB",
    per_request=0.0046,
    per_uncached_prompt_token=10.2e-6,
    per_token=1.0 / 183.33,
    source="Qwen2.5 speed benchmark (vLLM, A100, 1.5B: 183.33 tok/s); "
           "tt-inference-server#340 (Qwen3-1.7B on A100: TTFT 11.4 ms @128, 30.9 ms @2048)",
)

# Decode: the same Qwen2.5 table, Qwen2.5-32B-Instruct BF16 on one A100, 22.13 tokens/s.
# Prefill is compute-bound, so it scales with the non-embedding parameters (31.0 B vs 1.4 B for
# Qwen3-1.7B): 10.2 us x 22 = 225 us per token; Qwen3-14B on A100 in the same issue (282.8 ms
# at 2048 tokens, 138 us/token, x 2.2 for 32B = 305 us) bounds it from above. We take 250 us.
# The per-request cost is host-side work (HTTP, tokenizer, scheduler), the same as the 1.5B's.
TARGET_32B_A100 = GPUProfile(
    name="DeepSeek-R1-Distill-Qwen-32B, vLLM, 1x A100 80GB",
    per_request=0.0046,
    per_uncached_prompt_token=250e-6,
    per_token=1.0 / 22.13,
    source="Qwen2.5 speed benchmark (vLLM, A100, 32B BF16: 22.13 tok/s); prefill scaled by "
           "FLOPs from tt-inference-server#340 (Qwen3-1.7B, Qwen3-14B on A100)",
)
