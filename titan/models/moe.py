"""Mixture-of-Experts feed-forward for one device: a token-choice top-k router, grouped SwiGLU experts, the
sequence-wise auxiliary balance loss and the auxiliary-loss-free expert-bias update (DeepSeek-V3), dropless (no
capacity, no token dropped). docs/moe.md explains the routing and balancing; a family (titan/models/qwen3_moe.py)
puts an `MoE` where the shared decoder has its `FeedForward`.

Nothing here knows about processes: expert parallelism (titan/parallel/expert_parallel.py) and the ranks that split
a sequence (context and tensor parallelism) reach in from outside through two seams:

  `MoE.experts(x_sorted, counts)`  every routed token row, sorted by expert, and the rows per expert: a pre-hook may
      move them to the experts' owners and a post-hook bring the outputs back in the same order;
  `MoE.load(counts)`  this rank's tokens per (sequence, expert): a forward hook may sum them over the ranks that
      hold other parts of the same sequences, so that the balance statistics are those of whole sequences.

The loop's side of balancing is two calls: `set_aux_loss_scale(model_parts, 1 / n_tokens)` before the step's
forwards and `end_of_step(model_parts, reduce, update)` after its optimizer step (see their docstrings).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from titan.models.layers import FeedForward

SCORE_FUNCS = ("softmax", "sigmoid")


# ---------------------------------------------------------------------------------------------------------------
# Experts


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these inputs (torch 2.13): fp32/bf16/fp16; every stride but the last a
    multiple of 16 bytes (so `dim` and the expert width must be multiples of 4 in fp32, 8 in bf16); on CUDA only bf16
    on compute capability 9.0 and up. Elsewhere on CUDA (fp32, A100) torch's fallback copies the offsets to the host
    in every call (three syncs per forward, six more in backward), so the per-expert loop's one sync is cheaper."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.is_cuda and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0)):
        return False
    return all(s * t.element_size() % 16 == 0 for t in (x, *weights) for s in t.stride()[:-1])


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `x` runs in: autocast's, where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def expert_counts(experts: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0 ... n-1 occurs in `experts` (int64 [n]), with no host sync: a scatter-add of ones into n
    bins. torch.bincount reads the ids' min and max back to the host on CUDA (two syncs per call); a 1-D scatter_add_
    is deterministic under torch.use_deterministic_algorithms (torch's documentation), histc is not."""
    flat = experts.flatten()
    return torch.zeros(n, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: `_grouped_mm`'s backward rejects expanded gradients
    (e.g. of a `.sum()`; torch 2.13, "Invalid strides/sizes")."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss's gated unit: the gate clamped from above and the up projection on both sides at `limit`, then
    (up + 1) * gate * sigmoid(alpha * gate); the clamps keep the experts' activations bounded (no gradient past
    them)."""
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


class GroupedExperts(nn.Module):
    """`n_experts` SwiGLU experts stored stacked: w1 (gate) and w3 (up) [n_experts, hidden, dim], w2 (down)
    [n_experts, dim, hidden], i.e. each expert's nn.Linear weights, so expert j is w2[j](silu(w1[j] x) * w3[j] x).
    With `bias` each also has b1, b3 [n_experts, hidden] and b2 [n_experts, dim] (gpt-oss), stacked the same way;
    `glu(gate, up)` is the gated unit (`swiglu`, or gpt-oss's `clamped_swiglu`).

    `forward(x [T, dim], counts [n_local] int64) -> [T, dim]`: the rows of x sorted by expert (the first counts[0]
    rows go to local expert 0, ...), counts summing to T, n_local = the leading size of the weights held at call
    time (expert parallelism hands each rank its slice). An expert with no rows is fine. `grouped_mm=True` computes
    all experts in three `torch._grouped_mm` calls where the inputs allow it (`grouped_mm_supported`), else the
    per-expert loop, which is also the reference the tests compare against."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, grouped_mm: bool = True, bias: bool = False,
                 glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = swiglu):
        super().__init__()
        self.grouped_mm, self.glu = grouped_mm, glu
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        if bias:
            self.b1 = nn.Parameter(torch.empty(n_experts, hidden_dim))
            self.b2 = nn.Parameter(torch.empty(n_experts, dim))
            self.b3 = nn.Parameter(torch.empty(n_experts, hidden_dim))
        else:
            self.b1 = self.b2 = self.b3 = None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self.w1, self.w2, self.w3
        dtype = _matmul_dtype(x)
        if self.grouped_mm and grouped_mm_supported(x.to(dtype), w1.to(dtype), w2.to(dtype), w3.to(dtype)):
            # Under autocast the experts' matmuls run in its dtype, as a linear layer's would: fp32 tokens (one GPU
            # without FSDP, where the residual stream stays fp32) then take the grouped kernel, not the loop.
            return self._grouped(x.to(dtype), counts, w1.to(dtype), w2.to(dtype), w3.to(dtype))
        return self._loop(x, counts, w1, w2, w3)

    def _grouped(self, x, counts, w1, w2, w3) -> torch.Tensor:
        # Cumulative row ends per expert, int32 as _grouped_mm wants; rows past the last end would be left
        # unwritten, which counts summing to T rules out.
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        x = _ContiguousGrad.apply(x)
        gate = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
        if self.b1 is not None:  # each row gets its expert's biases (output_size: no host sync), in the matmul dtype
            expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts, output_size=len(x))
            gate, up = gate + self.b1[expert].to(gate.dtype), up + self.b3[expert].to(up.dtype)
        out = torch._grouped_mm(self.glu(gate, up), w2.transpose(-2, -1), offs=offs)
        if self.b2 is not None:
            out = out + self.b2[expert].to(out.dtype)
        return _ContiguousGrad.apply(out)

    def _loop(self, x, counts, w1, w2, w3) -> torch.Tensor:
        outs = []
        b1, b2, b3 = (self.b1, self.b2, self.b3) if self.b1 is not None else ([None] * len(counts),) * 3
        for j, rows in enumerate(x.split(counts.tolist())):  # .tolist(): one host sync per layer
            h = self.glu(F.linear(rows, w1[j], b1[j]), F.linear(rows, w3[j], b3[j]))
            outs.append(F.linear(h, w2[j], b2[j]))
        return torch.cat(outs) if outs else x.new_zeros(x.shape)

    def init_weights(self, init_std: float):
        nn.init.trunc_normal_(self.w1, mean=0.0, std=0.02)
        for w in (self.w2, self.w3):
            nn.init.trunc_normal_(w, mean=0.0, std=init_std)
        for b in (self.b1, self.b2, self.b3):
            if b is not None:
                nn.init.zeros_(b)


# ---------------------------------------------------------------------------------------------------------------
# Router


class Router(nn.Module):
    """Token-choice top-k: scores = softmax (Qwen3-MoE, gpt-oss) or sigmoid (DeepSeek-V3) of `gate(x)` (with a bias
    when `bias`: gpt-oss), in fp32. The top-k experts are chosen on scores + `expert_bias` (a persistent fp32 buffer,
    zeros unless the bias update moves it), among the `topk_groups` best of `n_groups` equal groups of experts when
    `n_groups > 1` (DeepSeek-V3's group-limited routing, `limit_to_groups`; its args check the groups); the weights
    are the unbiased scores of the chosen experts, renormalised to sum to 1 when `norm_topk_prob`, times
    `route_scale` (DeepSeek-V3's routed scaling factor). gpt-oss's softmax of the top-k logits is softmax + norm.

    `forward(x [T, dim]) -> (weights [T, k] fp32, experts [T, k] int64, scores [T, n_experts] fp32)`; the scores
    (normalised over the experts for sigmoid) feed the auxiliary loss."""

    def __init__(self, dim: int, n_experts: int, top_k: int, score_func: str = "softmax", norm_topk_prob: bool = True,
                 *, n_groups: int = 1, topk_groups: int = 1, route_scale: float = 1.0, bias: bool = False):
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r} is not one of {SCORE_FUNCS}")
        self.top_k, self.score_func, self.norm_topk_prob = top_k, score_func, norm_topk_prob
        self.n_groups, self.topk_groups, self.route_scale = n_groups, topk_groups, route_scale
        self.gate = nn.Linear(dim, n_experts, bias=bias)
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.gate(x).float()
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores.detach() + self.expert_bias
        if self.n_groups > 1:
            choice = limit_to_groups(choice, self.n_groups, self.topk_groups)
        experts = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        if self.score_func == "sigmoid":  # the balance loss wants a distribution over the experts per token
            scores = scores / scores.sum(dim=-1, keepdim=True)
        return weights, experts, scores

    def init_weights(self):
        nn.init.trunc_normal_(self.gate.weight, mean=0.0, std=0.02)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)
        self.expert_bias.zero_()


def limit_to_groups(choice: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """`choice` [T, n_experts] with every expert outside each token's `topk_groups` best groups set to -inf; a
    group's score is the sum of its two best experts' (DeepSeek-V3: routing stays within a few nodes when each
    node holds one group)."""
    grouped = choice.view(choice.shape[0], n_groups, -1)
    best = grouped.topk(2, dim=-1).values.sum(dim=-1).topk(topk_groups, dim=-1).indices
    keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=choice.device).scatter_(1, best, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)


class TokenLoad(nn.Module):
    """Hook point for the routing statistics; the identity in one process.

    `forward(counts) -> counts`: `counts` is an int64 tensor [batch, n_experts], how many of this rank's tokens of
    each sequence (row of the micro-batch) chose each expert (each token counts once for each of its top-k
    experts). A forward hook on this module (`register_forward_hook`) may return a replacement of the same shape and
    dtype: the sum over the ranks that hold other tokens of the same sequences (context parallelism, tensor
    parallelism's sequence shards), so that every such rank sees whole-sequence counts. The auxiliary loss reads
    what this returns; `tokens_per_expert` keeps this rank's own counts (`end_of_step` sums them over all ranks),
    and the tokens this rank routes are its own."""

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return counts


class _AuxLossGrad(torch.autograd.Function):
    """Returns `out` unchanged; in backward also gives `aux` (a summed auxiliary loss) the gradient `scale`, as if
    `aux * scale` had been added to the loss. This way the loss code and the pipeline schedules need not know about
    it (Megatron-LM's MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, out, aux, scale):
        ctx.save_for_backward(scale.clone())  # the buffer is refilled each step: keep this forward's value
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad, scale.to(grad.dtype if grad.dtype.is_floating_point else torch.float32), None


class MoE(nn.Module):
    """The Mixture-of-Experts feed-forward: route each token to its top-k experts, run every expert on its tokens
    (sorted by expert, one grouped matmul), weight and sum the k outputs per token, plus the optional shared expert
    (with a sigmoid gate if `shared_gate`, as Qwen2-MoE). Dropless: every token reaches all its k experts whatever
    the imbalance.

    `forward(x [batch, seq, dim]) -> [batch, seq, dim]`. While training (and grad enabled) it adds this rank's
    counts to `tokens_per_expert` (non-persistent fp32 [n_experts], reset by `end_of_step`) and, with
    `aux_loss_coef > 0`, attaches the sequence-wise balance loss's gradient:

        aux = coef * sum over tokens t of  sum_i f[b(t), i] * s[t, i],   f[b, i] = E / (K * S_b) * count[b, i]

    with s the router's scores, count the whole-sequence counts (through `load`), S_b the sequence's tokens, E
    experts, K = top_k. Summed over a sequence's tokens it is S_b times DeepSeek-V3's sequence-wise loss
    sum_i f_i P_i; dividing by the step's global count of routed tokens (`set_aux_loss_scale`) gives its mean over
    sequences (of equal length), the same for every split of the batch over ranks and micro-batches (docs/moe.md)."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int, *, score_func: str = "softmax",
                 norm_topk_prob: bool = True, shared_hidden_dim: int = 0, shared_gate: bool = False,
                 grouped_mm: bool = True, aux_loss_coef: float = 0.0, bias_update_rate: float = 0.0,
                 router: Router | None = None, experts: GroupedExperts | None = None):
        """`router`, `experts`: a family's own (group-limited routing, biased experts) instead of the plain ones
        built from the arguments before them."""
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.aux_loss_coef, self.bias_update_rate = aux_loss_coef, bias_update_rate
        self.router = router or Router(dim, n_experts, top_k, score_func, norm_topk_prob)
        self.load = TokenLoad()
        self.experts = experts or GroupedExperts(dim, hidden_dim, n_experts, grouped_mm)
        self.shared_expert = FeedForward(dim, shared_hidden_dim) if shared_hidden_dim else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_hidden_dim and shared_gate else None
        self.register_buffer("tokens_per_expert", torch.zeros(n_experts), persistent=False)
        self.register_buffer("aux_loss_scale", torch.zeros(()), persistent=False)  # 1 / the step's item count
        self.register_buffer("aux_loss_sum", torch.zeros(()), persistent=False)  # this step's, for the metrics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, seqlen, dim = x.shape
        tokens = x.reshape(-1, dim)
        weights, experts, scores = self.router(tokens)
        flat = experts.flatten()  # token t's k choices at rows t*k ... t*k + k-1
        order = torch.argsort(flat, stable=True)  # rows sorted by expert; stable: deterministic order
        counts = expert_counts(flat, self.n_experts)
        routed = self.experts(tokens[order // self.top_k], counts)
        # Back to (token, choice) order, weighted and summed over the k choices, in the activations' dtype.
        out = torch.empty_like(routed).index_copy_(0, order, routed)
        out = (out.view(-1, self.top_k, dim) * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            out = out + (shared if self.shared_gate is None else F.sigmoid(self.shared_gate(tokens)) * shared)
        out = out.view(bs, seqlen, dim)
        if self.training and torch.is_grad_enabled():
            out = self._balance(out, experts.view(bs, -1), scores.view(bs, seqlen, -1))
        return out

    def _balance(self, out: torch.Tensor, experts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Count the step's load and attach the auxiliary loss (see the class docstring)."""
        bs = experts.shape[0]
        rows = torch.arange(bs, device=experts.device).unsqueeze(1) * self.n_experts
        local = expert_counts(rows + experts, bs * self.n_experts).view(bs, -1)
        counts = self.load(local)
        # Activation checkpointing runs this again inside backward: the same graph (its saved tensors must match),
        # but the statistics were counted the first time.
        count = not _recomputing()
        if count:  # this rank's own tokens: `end_of_step`'s reduction adds the other ranks' once
            with torch.no_grad():
                self.tokens_per_expert += local.sum(dim=0).float()
        if self.aux_loss_coef <= 0:
            return out
        seq_tokens = counts.sum(dim=1, keepdim=True).float() / self.top_k  # S_b, whole sequences
        f = counts.float() * (self.n_experts / self.top_k) / seq_tokens.clamp(min=1)
        aux = self.aux_loss_coef * (scores * f.unsqueeze(1)).sum()
        if count:
            with torch.no_grad():
                self.aux_loss_sum += aux.detach()
        return _AuxLossGrad.apply(out, aux, self.aux_loss_scale)

    def init_weights(self, init_std: float):
        self.router.init_weights()
        self.experts.init_weights(init_std)
        if self.shared_expert is not None:
            self.shared_expert.init_weights(init_std)
        if self.shared_gate is not None:
            nn.init.trunc_normal_(self.shared_gate.weight, mean=0.0, std=0.02)
        self.init_buffers()

    def init_buffers(self):
        """The non-persistent statistics (after `to_empty`, or to reset them)."""
        for buf in (self.tokens_per_expert, self.aux_loss_scale, self.aux_loss_sum):
            buf.zero_()


def _recomputing() -> bool:
    # Inside backward: activation checkpointing's recomputation (torch 2.13 has no public flag for it).
    return torch._C._current_graph_task_id() != -1


# ---------------------------------------------------------------------------------------------------------------
# The loop's side: loss scale, bias update, statistics


def moe_layers(model_parts: Iterable[nn.Module]) -> list[tuple[str, MoE]]:
    """(layer name, MoE) of every MoE layer this rank holds, in model order."""
    return [(_layer_name(name), m) for part in model_parts for name, m in part.named_modules() if isinstance(m, MoE)]


def _step_layers(model_parts: Iterable[nn.Module]) -> list[tuple[str, MoE]]:
    """`moe_layers`, walked once per model part at its first use and then kept on the part: the loop asks twice a
    step, and by its first step the module tree is final (every wrapper applied)."""
    layers = []
    for part in model_parts:
        if "_moe_layers" not in part.__dict__:
            part.__dict__["_moe_layers"] = moe_layers([part])
        layers += part.__dict__["_moe_layers"]
    return layers


def _layer_name(name: str) -> str:
    # Wrappers from outside (activation checkpointing, compile) add private segments: "layers.3._checkpoint_wrapped_
    # module.feed_forward" is layer "layers.3".
    return ".".join(p for p in name.split(".") if not p.startswith("_")).removesuffix(".feed_forward")


def set_aux_loss_scale(model_parts: Iterable[nn.Module], scale: torch.Tensor | float) -> None:
    """What the auxiliary loss's sum is multiplied by in backward: 1 / the step's global count of routed tokens
    (titan/objectives/__init__.py:step_counts; in pre-training the LM loss's item count). Set before the step's first
    forward (the same for all its micro-batches)."""
    for _, m in _step_layers(model_parts):
        m.aux_loss_scale.fill_(scale)


@torch.no_grad()
def update_expert_bias(layer: MoE, load: torch.Tensor) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the selection bias of under-loaded experts and lower it
    for over-loaded ones by `bias_update_rate`, from the step's global load [n_experts]. Not a gradient."""
    if layer.bias_update_rate > 0:
        layer.router.expert_bias += layer.bias_update_rate * torch.sign(load.mean() - load)


@torch.no_grad()
def end_of_step(model_parts: Iterable[nn.Module], reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                update: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """After the optimizer step: the step's global load of every MoE layer and its summed auxiliary loss, the
    expert-bias update (when `update`, i.e. the step was not skipped), then the statistics are reset.

    One collective: `reduce` gets an fp32 tensor [n_layers (+ MTP depths), n_experts + 1] (row i: layer i's
    `tokens_per_expert`, then its `aux_loss_sum`; zero rows for layers this rank does not hold) and must return its
    sum over every rank that holds other tokens or other layers (data-parallel, context-parallel ranks and pipeline
    stages: titan's loop uses its `pp_dp_cp` mesh); None in one process. Returns ({layer name: load [n_experts]} of
    every MoE layer of the model, the step's summed auxiliary loss over all of them or None without MoE layers)."""
    layers, first = _step_layers(model_parts), next(iter(model_parts))
    args = getattr(first, "args", None)
    # A pipeline stage of only dense layers (mlp_only_layers) still joins the other stages' reduction.
    n_experts = layers[0][1].n_experts if layers else getattr(args, "n_experts", 0)
    if not n_experts:
        return {}, None
    n_rows = args.n_layers + getattr(args, "mtp_layers", 0) if args is not None else len(layers)
    rows = [_layer_index(name, args.n_layers) for name, _ in layers] if args is not None else list(range(n_rows))
    device = layers[0][1].tokens_per_expert.device if layers else next(first.parameters()).device
    stats = torch.zeros(n_rows, n_experts + 1, device=device)
    for row, (_, m) in zip(rows, layers):
        stats[row, :-1], stats[row, -1] = m.tokens_per_expert, m.aux_loss_sum
    if reduce is not None:
        stats = reduce(stats)
    for row, (_, m) in zip(rows, layers):
        if update:
            update_expert_bias(m, stats[row, :-1])
        m.init_buffers()
    names = {row: name for row, (name, _) in zip(rows, layers)}
    loads = {names.get(i, f"layers.{i}"): stats[i, :-1] for i in _moe_rows(args, stats)}
    return loads, stats[:, -1].sum()


def _moe_rows(args, stats: torch.Tensor) -> list[int]:
    """The rows of `stats` that are MoE layers, those of other pipeline stages included: every row without `args`;
    else the family's rule (`is_moe_layer`), known without looking at the counts; else the rows that routed tokens,
    which costs a host sync per step."""
    if args is None:
        return list(range(stats.shape[0]))
    if hasattr(args, "is_moe_layer"):
        return [i for i in range(stats.shape[0]) if args.is_moe_layer(i)]
    return [i for i, routed in enumerate((stats[:, :-1].sum(dim=1) > 0).tolist()) if routed]


def _layer_index(name: str, n_layers: int) -> int:
    """The stats row of "layers.3" (3), or of a multi-token prediction depth's block "mtp.0.block" (n_layers + 0)."""
    parts = name.split(".")
    return n_layers + int(parts[1]) if parts[0] == "mtp" else int(parts[-1])


def step_metrics(loads: dict[str, torch.Tensor], aux_loss_sum: torch.Tensor | None,
                 n_tokens: torch.Tensor) -> dict[str, object]:
    """What the loop logs (titan/metrics.py): `aux_loss` (per routed token; its coefficient included),
    `moe_max_imbalance` (the largest max / mean tokens per expert over the layers; 1 = balanced) and
    `expert_load` {layer: {"tokens": [per expert], "imbalance": max / mean}} (metrics.jsonl and TensorBoard only)."""
    if aux_loss_sum is None:
        return {}
    imbalance = {name: load.max() / load.mean().clamp(min=1e-9) for name, load in loads.items()}
    return {"aux_loss": aux_loss_sum / n_tokens, "moe_max_imbalance": torch.stack(list(imbalance.values())).max(),
            "expert_load": {name: {"tokens": load, "imbalance": imbalance[name]} for name, load in loads.items()}}


def active_params(model: nn.Module) -> int:
    """Parameters one token uses: all of them less the (n_experts - top_k) / n_experts of every MoE layer's routed
    experts that it does not reach (tied weights counted once)."""
    total = sum(p.numel() for p in model.parameters())
    for _, m in moe_layers([model]):
        routed = sum(p.numel() for p in m.experts.parameters())
        total -= routed * (m.n_experts - m.top_k) // m.n_experts
    return total
