"""The exact floating-point-operation count of GPT-2 forward passes, from the config alone (see docs/cost.md).

A matrix product of [m, k] by [k, n] costs 2*m*k*n FLOPs. Element-wise work (LayerNorm, GELU, softmax, bias
adds, residuals) is not counted, as in `torch.utils.flop_counter`.
"""

from __future__ import annotations

from quill.model import GPTConfig


def linear_flops_per_token(config: GPTConfig) -> int:
    """Projection FLOPs of one token through every block: fused qkv, attention out, MLP in and out."""
    c, i = config.n_embd, config.inner_dim
    return config.n_layer * 2 * (c * 3 * c + c * c + c * i + i * c)


def attention_flops(config: GPTConfig, new_tokens: int, cached_tokens: int) -> int:
    """q@k^T and p@v for each new token over its real context: token j (1-based) sees cached+j keys."""
    keys = new_tokens * cached_tokens + new_tokens * (new_tokens + 1) // 2
    return config.n_layer * 4 * config.n_embd * keys


def forward_flops(config: GPTConfig, new_tokens: int, cached_tokens: int = 0,
                  logit_positions: int | None = None) -> int:
    """FLOPs of one forward of `new_tokens` after `cached_tokens` in the KV cache.

    `logit_positions` is how many positions go through the lm_head (default: all new tokens; a
    generation step needs only the last one).
    """
    if new_tokens < 0 or cached_tokens < 0:
        raise ValueError("token counts must be non-negative")
    heads = new_tokens if logit_positions is None else logit_positions
    return (new_tokens * linear_flops_per_token(config)
            + attention_flops(config, new_tokens, cached_tokens)
            + heads * 2 * config.n_embd * config.vocab_size)


def generation_flops(config: GPTConfig, prompt_tokens: int, new_tokens: int, kv_cache: bool = True,
                     cached_tokens: int = 0) -> int:
    """FLOPs to generate `new_tokens` after a prompt: one prefill then one step per further token.

    Without a KV cache every step recomputes the whole prefix, which is what capped the canister seeds. The first
    `cached_tokens` of the prompt came from the prefix cache: the prefill computes only the rest.
    """
    if new_tokens <= 0:
        return 0
    if kv_cache:
        total = forward_flops(config, prompt_tokens - cached_tokens, cached_tokens, 1)
        for t in range(1, new_tokens):
            total += forward_flops(config, 1, prompt_tokens + t - 1, 1)
        return total
    return sum(forward_flops(config, prompt_tokens + t, 0, 1) for t in range(new_tokens))
