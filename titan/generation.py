"""Text generation with a KV cache: a batch of prompts of different lengths, greedy decoding or sampling
(temperature, top-k, top-p), stop tokens, and random draws that belong to each row rather than to the batch.

Owns only the decoding loop. The prompts are left-padded to a common length and every row keeps its own RoPE
positions (0 for its first real token), so a row generates what it would generate alone; the attention mask hides
the padding. The cache is preallocated for the prompt plus `max_new_tokens` (titan/models/kv_cache.py:KVCache), so
every decoding step has the same shapes and `compiled=True` traces the step once. Sampling draws one uniform number
per row and step from that row's own generator, so a row's tokens depend on its seed and its logits only, not on
which other rows share its batch or how a run splits rows over processes (titan/rollout.py seeds each completion by
its step and prompt).

The model is a single-device `titan.models` model (or any module with the same forward and `args.max_seq_len`);
nothing here knows about processes or meshes. Tokenizers, chat templates and checkpoint loading belong to the caller
(scripts/generate.py). `generate_without_cache` is the reference the tests and scripts/benchmark_generate.py compare
against: it recomputes the whole sequence for every new token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan.models.layers import KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits: greedy when temperature == 0, else sampled from
    softmax(logits / temperature) restricted to the top_k most likely tokens (0 = all) and then to the smallest set
    of them whose probability reaches top_p (1.0 = all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"generate: temperature={self.temperature} and top_k={self.top_k} must be >= 0, "
                             f"top_p={self.top_p} in (0, 1]")


def pick(logits: torch.Tensor, sampling: Sampling, uniforms: torch.Tensor | None) -> torch.Tensor:
    """The next token of each row: logits (rows, vocab) -> (rows,) int64. `uniforms` (rows,) in [0, 1), one per row
    (unused when greedy), chooses by inverse transform over the kept tokens' probabilities, so that a row's token is
    a function of its own logits and its own number."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    index = None  # the kept tokens' vocabulary ids, if not all of them in order
    if sampling.top_k:
        logits, index = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1)  # sorted, largest first
    elif sampling.top_p < 1:
        logits, index = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1:
        # Keep a token while the probability of the more likely ones is below top_p: the most likely always stays.
        probs = probs * ((probs.cumsum(dim=-1) - probs) < sampling.top_p)
    cdf = probs.cumsum(dim=-1)
    # right=True: the first token whose cumulative probability exceeds u * total, never a zero-probability one.
    choice = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1), right=True)
    choice = choice.clamp(max=cdf.shape[-1] - 1)
    return (choice if index is None else index.gather(1, choice)).squeeze(1)


def _uniforms(generators, rows: int, steps: int) -> torch.Tensor | None:
    """(rows, steps) uniform numbers: row i's from generators[i] (one generator per row), or all from one."""
    if generators is None:
        return torch.rand(rows, steps)
    if isinstance(generators, torch.Generator):
        return torch.rand(rows, steps, generator=generators)
    if len(generators) != rows:
        raise ValueError(f"generate: {len(generators)} generators for {rows} prompts")
    # Drawn on the CPU, where a generator's sequence is the same on any machine.
    return torch.stack([torch.rand(steps, generator=g) for g in generators])


def generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), stop_ids=(), generators=None, compiled: bool = False,
             stats: dict | None = None) -> list[list[int]]:
    """The new tokens (not the prompt) of each prompt, in order. A row stops after max_new_tokens, after a token in
    `stop_ids` (which is included) or when its prompt plus its new tokens fill the model's RoPE table
    (args.max_seq_len: the logits at the last position still give one more token). `generators`: one
    torch.Generator per prompt (a row's draws then depend on its generator only), one for all, or None (torch's
    global one). `compiled`: run the decoding step through torch.compile (static shapes; worth it for long
    generations on a GPU). `stats`, if given, receives "entropy_sum" (of the model's own next-token distribution,
    temperature 1, at every new token) and "tokens" (the new tokens). The model is put in eval mode for the call
    and given back as it was."""
    _check(model, prompts, max_new_tokens)
    max_seq_len = model.args.max_seq_len
    device = next(model.parameters()).device
    rows, longest = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    # Row i may give max_seq_len - len_i + 1 tokens (its last position predicts one more).
    steps = min(max_new_tokens, max_seq_len - int(lengths.min()) + 1)
    if stats is not None:
        stats.update(entropy_sum=0.0, tokens=0)
    if steps <= 0:
        return [[] for _ in prompts]
    uniforms = _uniforms(generators, rows, steps).to(device) if sampling.temperature > 0 else None
    tokens = torch.zeros(rows, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token is in the last column
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = longest - lengths
    needed = longest + steps - 1
    # Compiled: the cache's length rounded up to a power of two, so that prompts of other lengths (the next rollout)
    # reuse the compiled step instead of compiling another (the mask hides the spare columns).
    cache = KVCache(rows, max(64, 1 << (needed - 1).bit_length()) if compiled else needed)
    limit = (max_seq_len - lengths + 1).clamp(max=steps)  # new tokens each row may give
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    out = torch.zeros(rows, steps, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    ended = torch.full((rows,), steps, device=device)  # each row's count of new tokens
    step_fn = _compiled_step(model) if compiled else decode_step
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = prefill(model, tokens, pad, cache)
            entropy = torch.zeros((), device=device)
            for t in range(steps):
                nxt = pick(logits, sampling, None if uniforms is None else uniforms[:, t])
                out[:, t] = nxt
                if stats is not None:
                    entropy += (_entropy(logits) * ~done).sum()
                finished = ~done & (torch.isin(nxt, stop) | (t + 1 >= limit))
                ended = torch.where(finished, t + 1, ended)
                done |= finished
                if t + 1 == steps or bool(done.all()):  # one host sync per token
                    break
                logits = step_fn(model, nxt, torch.tensor([longest + t], device=device), pad, cache)
    finally:
        model.train(was_training)
    if stats is not None:
        stats.update(entropy_sum=float(entropy), tokens=int(ended.sum()))
    return [row[:n] for row, n in zip(out.tolist(), ended.tolist())]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _check(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate: a prompt is empty (the model needs at least one token to continue)")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 0")
    longest = max(len(p) for p in prompts)
    if longest > model.args.max_seq_len:
        raise ValueError(f"generate: a prompt has {longest} tokens, more than the model's max_seq_len="
                         f"{model.args.max_seq_len}")


def prefill(model: torch.nn.Module, tokens: torch.Tensor, pad: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the left-padded prompts (rows, longest) through the model, filling the cache's first columns; returns
    the logits (rows, vocab) of each row's last token."""
    cols = torch.arange(tokens.shape[1], device=tokens.device)
    cache.slots = cols
    cache.mask = _mask(cols, pad, cache.max_len)
    positions = (cols - pad.unsqueeze(1)).clamp(min=0)
    return model(tokens, positions=positions, cache=cache)[:, -1].float()


def decode_step(model: torch.nn.Module, token: torch.Tensor, slot: torch.Tensor, pad: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """Feed each row's newest token (rows,) at cache column `slot` (a 1-element tensor, so that a compiled step
    does not specialise on it); returns the logits (rows, vocab) of the token after it. The positions are clamped
    to the RoPE table: a row that reached its end is still fed (fixed shapes) but its output is not used."""
    cache.slots = slot
    cache.mask = _mask(slot, pad, cache.max_len)
    positions = (slot - pad).clamp(min=0, max=model.args.max_seq_len - 1).unsqueeze(1)
    return model(token.unsqueeze(1), positions=positions, cache=cache)[:, -1].float()


def _mask(cols: torch.Tensor, pad: torch.Tensor, max_len: int) -> torch.Tensor:
    """(rows, len(cols), max_len): the token at column c sees the columns up to c that are not padding, and
    itself (so that a padding token's attention has a key and stays finite; no real token looks at it)."""
    keys = torch.arange(max_len, device=cols.device)
    query = cols.view(1, -1, 1)
    visible = (keys.view(1, 1, -1) <= query) & (keys.view(1, 1, -1) >= pad.view(-1, 1, 1))
    return visible | (keys.view(1, 1, -1) == query)


def _compiled_step(model: torch.nn.Module):
    # Kept on the model so that later calls reuse the compiled code; dynamic=False: every step has the same shapes.
    if "_compiled_decode_step" not in model.__dict__:
        model.__dict__["_compiled_decode_step"] = torch.compile(decode_step, dynamic=False)
    return model.__dict__["_compiled_decode_step"]


def generate_without_cache(model: torch.nn.Module, prompt: list[int], max_new_tokens: int,
                           sampling: Sampling = Sampling(), stop_ids=(), generator: torch.Generator | None = None
                           ) -> list[int]:
    """The reference: one prompt, the whole sequence recomputed for each new token (no cache, no padding). The same
    stopping rules and, for a given generator, the same draws as `generate` with a one-element list."""
    _check(model, [prompt], max_new_tokens)
    max_len = model.args.max_seq_len
    steps = min(max_new_tokens, max_len - len(prompt) + 1)
    uniforms = _uniforms([generator] if generator else None, 1, max(steps, 0)) if sampling.temperature else None
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    stop, new = set(stop_ids), []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for t in range(steps):
                logits = model(tokens)[:, -1].float()
                new.append(int(pick(logits, sampling, None if uniforms is None else uniforms[:, t].to(device))))
                if new[-1] in stop:
                    break
                tokens = torch.cat([tokens, tokens.new_tensor([[new[-1]]])], dim=1)
    finally:
        model.train(was_training)
    return new
