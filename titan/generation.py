"""Text generation for trying out a model: greedy decoding, or temperature sampling with optional top-k.

Owns only the decoding loop. No KV cache: each new token recomputes the whole sequence, which is plenty for a
135M-parameter model on a CPU and keeps the model code untouched. Tokenizers, chat templates and checkpoint loading
belong to the caller (scripts/generate.py).
"""

from __future__ import annotations

import torch


def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, stop_ids=(), generator: torch.Generator | None = None) -> list[int]:
    """The new tokens (not the prompt) of a `titan.models.llama.Transformer` continuing `prompt_ids`: greedy when
    temperature == 0, else sampled from softmax(logits / temperature) over the top_k most likely tokens (0 = all).
    Stops after max_new_tokens or a token in `stop_ids` (which is included). The prompt plus the new tokens must fit
    the model's RoPE table (args.max_seq_len); a prompt that does not is a ValueError, and generation stops early
    when the table is full."""
    if not prompt_ids:
        raise ValueError("generate: the prompt is empty (the model needs at least one token to continue)")
    if temperature < 0 or top_k < 0 or max_new_tokens < 0:
        raise ValueError(f"generate: temperature={temperature}, top_k={top_k} and max_new_tokens={max_new_tokens} "
                         f"must be >= 0")
    max_len = model.args.max_seq_len
    if len(prompt_ids) > max_len:
        raise ValueError(f"generate: the prompt has {len(prompt_ids)} tokens, more than the model's max_seq_len="
                         f"{max_len}")
    device = next(model.parameters()).device
    stop = set(stop_ids)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # The logits at position n - 1 predict token n, so a full table (n == max_len) can still give one more.
            while len(new) < max_new_tokens and tokens.shape[1] <= max_len:
                logits = model(tokens)[0, -1].float()
                next_id = _pick(logits, temperature, top_k, generator)
                new.append(next_id)
                if next_id in stop or tokens.shape[1] == max_len:
                    break
                tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    finally:
        model.train(was_training)
    return new


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    if top_k:
        # Everything below the k-th largest logit is excluded (ties at the threshold are kept).
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    # The generator lives on the CPU; sampling there makes a seed give the same tokens on any device.
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
