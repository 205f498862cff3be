#!/usr/bin/env python
"""Time titan's Transformer alone against an independent implementation of the same math: torchtitan v0.2.2's Llama
where it can be imported, else `PlainTransformer` below.

    python scripts/benchmark_model.py [--shapes debugmodel,4x1024 --modes eager,compiled] [--steps 20 --warmup 5]
        [--reference auto|torchtitan|plain --reference_path DIR[:DIR] --threads N] [--json out.json]

How it measures (see docs/performance.md): forward + backward in fp32 on one device, same weights, logits checked
equal (1e-6) before timing (`check_parity`); in eager mode the aten ops and the bytes saved for the backward are
counted (`count_work`); the ratio reported is the median over alternating pairs of titan step time / reference step
time (`time_pairs`). scripts/benchmark.py measures titan's whole training loop instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from titan import models
from titan.errors import ConfigError
from titan.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_common.py, however this file is loaded
from benchmark_common import STEP_RANGES, device_name, fmt_s, git_commit, median
from flags import NEW_FILE, Parser

# name -> (llama3 flavor, overrides, batch, seq_len); RoPE unscaled (torchtitan's table is told so, see below).
MODEL_SHAPES: dict[str, tuple[str, dict, int, int]] = {
    "tiny": ("tiny", {"vocab_size": 256}, 2, 32),  # for tests
    "debugmodel": ("debugmodel", {}, 8, 256),
    "4x1024": ("debugmodel", {"dim": 1024, "n_layers": 4}, 2, 256),  # 16 heads, 8 KV heads like the debug model
}
PARITY_RTOL = 1e-6  # largest logits difference / largest logit, fp32: rounding differences only


class ParityError(Exception):
    pass


class PlainAttention(nn.Module):
    """Written out independently of titan/models/layers.py: real-valued RoPE on channel pairs, grouped-query
    attention by SDPA's `enable_gqa`. Parameter names follow titan's so that its state dict loads."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True,
                                             enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def rotate(x, cos, sin):
    """(b, h, s, d): channels (2i, 2i+1) rotated by the angle of position s and frequency i."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class PlainBlock(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.attention_norm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.attention = PlainAttention(a.dim, a.n_heads, a.n_kv_heads)
        self.ffn_norm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.feed_forward = nn.Module()
        ff = self.feed_forward
        ff.w1, ff.w3 = (nn.Linear(a.dim, a.ffn_hidden_dim, bias=False) for _ in range(2))
        ff.w2 = nn.Linear(a.ffn_hidden_dim, a.dim, bias=False)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        ff, y = self.feed_forward, self.ffn_norm(h)
        return h + ff.w2(F.silu(ff.w1(y)) * ff.w3(y))


class PlainTransformer(nn.Module):
    """The reference when torchtitan cannot be imported: a Llama (unscaled RoPE, untied) in 40 plain lines."""

    def __init__(self, a):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleDict({str(i): PlainBlock(a) for i in range(a.n_layers)})
        self.norm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        hd = a.dim // a.n_heads
        inv_freq = a.rope_theta ** -(torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angles = torch.outer(torch.arange(a.max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, tokens):
        s = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.cos[:s], self.sin[:s])
        return self.output(self.norm(h))


def torchtitan_model(a, reference_path: str) -> tuple[nn.Module | None, str]:
    """torchtitan's Llama 3 for titan's args `a`, or (None, why not). Its package needs its trainer's dependencies
    (tyro, datasets, triton: its __init__ imports them) even for the model; none of them is titan's."""
    for path in reversed([p for p in reference_path.split(os.pathsep) if p]):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs
        from torchtitan.models.llama3.model.model import Transformer as TorchtitanTransformer
    except Exception as e:  # ImportError, or an import-time failure of one of its dependencies
        return None, f"torchtitan not importable ({type(e).__name__}: {e})"
    import torchtitan
    version = getattr(torchtitan, "__version__", "?")
    # scaling_factor 1 makes torchtitan's always-on Llama 3.1 frequency scaling the identity, as titan's shapes here.
    tt_args = TransformerModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                                   vocab_size=a.vocab_size, multiple_of=a.multiple_of,
                                   ffn_dim_multiplier=a.ffn_dim_multiplier, norm_eps=a.norm_eps,
                                   rope_theta=a.rope_theta, rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0),
                                   max_seq_len=a.max_seq_len)
    return TorchtitanTransformer(tt_args), f"torchtitan {version} Llama 3 ({Path(torchtitan.__file__).parent})"


def build_model_pair(shape: str, reference: str, reference_path: str) -> tuple[nn.Module, nn.Module, str]:
    """titan's Transformer and the reference for `shape`, the reference holding titan's freshly initialised
    weights."""
    flavor, overrides, _, seq_len = MODEL_SHAPES[shape]
    a = models.model_args("llama3", flavor, max_seq_len=seq_len, rope_scaling=None, **overrides)
    torch.manual_seed(0)
    model = build_model(a)
    model.init_weights()
    ref, name = (None, "--reference plain")
    if reference != "plain":
        ref, name = torchtitan_model(a, reference_path)
        if ref is None and reference == "torchtitan":
            raise ParityError(name)
    if ref is None:
        ref, name = PlainTransformer(a), f"the plain Llama in scripts/benchmark_model.py ({name})"
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref, name


def check_parity(model: nn.Module, ref: nn.Module, tokens: torch.Tensor) -> float:
    """The largest logits difference relative to the largest logit; ParityError beyond PARITY_RTOL (then the two do
    not compute the same function). Relative: each side computes its own RoPE table, which differ in the last bit."""
    with torch.no_grad():
        logits = model(tokens)
        diff = ((logits - ref(tokens)).abs().max() / logits.abs().max()).item()
    if not diff <= PARITY_RTOL:
        raise ParityError(f"logits differ from the reference by {diff:.3e} (relative) > {PARITY_RTOL:g}: "
                          "not the same model")
    return diff


def fwd_bwd(model: nn.Module, tokens: torch.Tensor) -> None:
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for p in model.parameters():
        p.grad = None


def fwd_bwd_time(model: nn.Module, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    fwd_bwd(model, tokens)
    return time.perf_counter() - start


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched below autograd: the forward's and the backward's, views included."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_work(model: nn.Module, tokens: torch.Tensor) -> dict:
    """The work of one forward + backward, independent of the machine's load: the aten ops it dispatches and the
    bytes autograd saves for the backward (each storage once; the weights included, the same on both sides)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with OpCounter() as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fwd_bwd(model, tokens)
    return {"aten_ops": sum(counter.ops.values()), "saved_bytes": sum(saved.values()), "ops": dict(counter.ops)}


def work_differences(titan: dict, ref: dict) -> str:
    """The aten ops whose counts differ, "name titan/reference", or "none"."""
    names = sorted(set(titan["ops"]) | set(ref["ops"]))
    diff = [f"{n} {titan['ops'].get(n, 0)}/{ref['ops'].get(n, 0)}" for n in names
            if titan["ops"].get(n, 0) != ref["ops"].get(n, 0)]
    return ", ".join(diff) or "none"


def ratio_stats(ratios: list[float]) -> dict:
    """Median of the per-pair ratios, its distribution-free 95 % interval (order statistics of a binomial(n, 1/2),
    normal approximation), the quartiles and the share of pairs titan won: how far the median can be trusted."""
    s, n = sorted(ratios), len(ratios)
    half = 0.98 * math.sqrt(n)
    lo, hi = max(0, round(n / 2 - half) - 1), min(n - 1, round(n / 2 + half))  # 0-based ranks
    q1, _, q3 = statistics.quantiles(s, n=4) if n > 1 else (s[0], None, s[0])
    return {"ratio_median": median(s), "ratio_ci95": [s[lo], s[hi]], "ratio_quartiles": [q1, q3],
            "titan_faster_share": sum(r < 1 for r in s) / n}


def time_pairs(model: nn.Module, ref: nn.Module, tokens: torch.Tensor, steps: int, warmup: int) -> dict:
    """Alternating steps, which one goes first swapped each pair, so that load and clock drift hit both alike. Also
    the ratio of the fastest steps: the least disturbed step of each, another load-robust view."""
    ratios, times = [], {"titan": [], "reference": []}
    for i in range(warmup + steps):
        order = (("titan", model), ("reference", ref)) if i % 2 == 0 else (("reference", ref), ("titan", model))
        t = {name: fwd_bwd_time(m, tokens) for name, m in order}
        if i >= warmup:
            ratios.append(t["titan"] / t["reference"])
            for name in t:
                times[name].append(t[name])
    return {**ratio_stats(ratios), "ratio_of_fastest": min(times["titan"]) / min(times["reference"]),
            "ratios": ratios, "titan_median_s": median(times["titan"]),
            "reference_median_s": median(times["reference"])}


def run_model_only(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = []
    for shape in args.shapes.split(","):
        _, _, batch, seq_len = MODEL_SHAPES[shape]
        try:
            model, ref, ref_name = build_model_pair(shape, args.reference, args.reference_path)
        except ParityError as e:  # --reference torchtitan and it does not import
            print(f"benchmark: error: {e}", file=sys.stderr)
            return 1
        tokens = torch.randint(model.args.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
        for mode in args.modes.split(","):
            if mode == "compiled":  # as titan compiles the model (titan/parallel/parallelize.py): each block
                for m in (model, ref):
                    for block in m.layers.values():
                        block.compile(fullgraph=True)
            try:
                diff = check_parity(model, ref, tokens[:, :-1])
            except ParityError as e:
                print(f"benchmark: error: {shape} ({mode}): {e}", file=sys.stderr)
                return 1
            row = {"shape": shape, "mode": mode, "batch": batch, "seq_len": seq_len, "reference": ref_name,
                   "logits_max_rel_diff": diff}
            if mode == "eager":  # under compile the aten ops run inside compiled graphs, out of the counter's sight
                row["work"] = work = {"titan": count_work(model, tokens), "reference": count_work(ref, tokens)}
                print(f"{shape:>10} {mode:>8}: work per forward+backward: aten ops titan "
                      f"{work['titan']['aten_ops']}, reference {work['reference']['aten_ops']}; saved for backward "
                      f"titan {work['titan']['saved_bytes'] / 2**20:.2f} MiB, reference "
                      f"{work['reference']['saved_bytes'] / 2**20:.2f} MiB; ops that differ (titan/reference): "
                      f"{work_differences(work['titan'], work['reference'])}", flush=True)
            r = time_pairs(model, ref, tokens, args.steps, args.warmup)
            results.append({**row, **r})
            print(f"{shape:>10} {mode:>8}: titan / reference = {r['ratio_median']:.3f} (median of {args.steps} "
                  f"pairs; 95 % interval {r['ratio_ci95'][0]:.3f}-{r['ratio_ci95'][1]:.3f}, quartiles "
                  f"{r['ratio_quartiles'][0]:.3f}-{r['ratio_quartiles'][1]:.3f}, titan faster in "
                  f"{r['titan_faster_share']:.0%} of pairs, fastest steps {r['ratio_of_fastest']:.3f}; titan "
                  f"{fmt_s(r['titan_median_s']).strip()}, reference {fmt_s(r['reference_median_s']).strip()}; "
                  f"logits max |diff| {diff:.1e} relative)", flush=True)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
               "device": device_name(torch.device("cpu")), "torch_version": torch.__version__,
               "commit": git_commit(), "threads": torch.get_num_threads(),
               "reference": results[0]["reference"] if results else None,
               "method": MODEL_ONLY_METHOD, "results": results}
    print(f"reference: {summary['reference']}; intra-op threads: {summary['threads']}\n"
          f"measured as: {MODEL_ONLY_METHOD}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


MODEL_ONLY_METHOD = ("forward + cross-entropy + backward, fp32, one process; titan's and the reference's steps "
                     "alternate (order swapped each pair) after warm-up; ratio = median of per-pair titan / reference")


def check_choices(ns) -> None:
    """Each of --shapes and --modes from its list, and each --reference_path entry a folder (a typo would silently
    fall back to the plain reference)."""
    for flag, given, known in (("shapes", ns.shapes, MODEL_SHAPES), ("modes", ns.modes, ("eager", "compiled"))):
        bad = [x for x in given.split(",") if x not in known]
        if bad:
            raise ConfigError(f"--{flag}: {', '.join(map(repr, bad))} is not one of {', '.join(known)}")
    missing = [d for d in ns.reference_path.split(os.pathsep) if d and not Path(d).is_dir()]
    if missing:
        raise ConfigError(f"--reference_path: {missing[0]!r} is not a folder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="benchmark_model.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
               ranges={**STEP_RANGES, "threads": (0, 1024)}, paths={"json": NEW_FILE},
               check=check_choices)
    p.add_argument("--shapes", default="debugmodel,4x1024", help=f"comma-separated, of {', '.join(MODEL_SHAPES)}")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated, of eager, compiled")
    p.add_argument("--steps", type=int, default=20, help="measured pairs (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="pairs run before measuring (default 5; at least 1: the "
                   "first step includes one-time costs)")
    p.add_argument("--reference", default="auto", choices=("auto", "torchtitan", "plain"),
                   help="auto: torchtitan's Llama if it imports, else the plain one in this script")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads for the model steps (default 0: torch's, one per core); 1 is steadier on a "
                        "loaded machine, where a step's threads wait for the slowest")
    p.add_argument("--reference_path", default="",
                   help=f"directories ({os.pathsep}-separated) added to sys.path to import torchtitan from")
    p.add_argument("--json", help="also write the results as JSON to this path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_model_only(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
