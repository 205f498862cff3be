#!/usr/bin/env python
"""Benchmark titan on one config: throughput, MFU, a step-time breakdown, peak memory, and titan's overhead over a
minimal hand-written PyTorch loop doing the same math.

    python scripts/benchmark.py --config train_configs/debug_model.toml [--steps 20 --warmup 5] [--json out.json]
        [--section.key value ...]
    torchrun --nproc_per_node=2 scripts/benchmark.py --config FILE ...   (no overhead ratio: see below)
    python scripts/benchmark.py --model_only [--shapes debugmodel,4x1024 --modes eager,compiled]
        [--reference auto|torchtitan|plain --reference_path DIR[:DIR] --threads N]

How it measures (see docs/performance.md):
  * titan runs its real loop (`titan.build.build` + `titan.train.train`) for warmup + steps steps, with validation off
    and the config's other settings kept (logging, checkpointing). `StepTimer` in the loop records each step's wall time
    and its regions: data wait, forward+backward, optimizer (clip + step + LR + zero_grad), and any other region the
    loop times (a region named "checkpoint" is reported as checkpoint blocking). On CUDA the timer synchronises the
    device before every clock read, so regions hold device time; on CPU it just reads perf_counter.
  * In the same process a minimal loop (`MinimalLoop` below: same Transformer class and flavor, same per-device
    batch, seq_len, dtype, AdamW settings, clipping and compile; one pre-made batch already on the device, plain
    PyTorch, no titan code) alternates with titan's: after titan's warm-up it warms up itself, then runs one step
    after each of titan's measured steps (`AlternatingTimer`), so both see the same machine state. Its time is kept
    out of titan's step times; it synchronises CUDA before each clock read.
  * Times are medians of per-step times after the warm-up steps (robust to a disturbed machine);
    overhead ratio = titan median step time / minimal median step time. tokens/s = tokens per step / mean step time.
  * The minimal loop is one device without parallelism, activation checkpointing or float8: under torchrun, or when
    those are enabled, the ratio is not computed (reported as n/a with the reason).

--model_only times titan's Transformer alone against an independent implementation of the same math (see
`run_model_only`): torchtitan v0.2.2's Llama where it can be imported, else `PlainTransformer` below. Forward +
backward in fp32 on one device, same weights, logits checked equal (1e-6) before timing; the ratio reported is the
median over alternating pairs of titan step time / reference step time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from titan import config, config_io, models
from titan.build import build
from titan.config import DTYPES
from titan.errors import ConfigError
from titan.metrics import StepTimer, setup_logging
from titan.models import build_model
from titan.train import train

REPO = Path(__file__).resolve().parent.parent
FLOP_CONVENTION = ("6 x non-embedding parameters + 12 x n_layers x n_heads x head_dim x seq_len per token "
                   "(PaLM appendix B / torchtitan; titan/metrics.py:num_flops_per_token)")
METHOD = ("median of per-step wall times after warm-up; same process, alternating: one minimal-loop step after each "
          "titan step (not counted in titan's); CUDA synchronised before each clock read")
REGIONS = ("data", "forward_backward", "optimizer", "checkpoint")  # table order; other regions follow


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--config", help="titan TOML config (required unless --model_only)")
    p.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="steps run before measuring (default 5)")
    p.add_argument("--json", help="also write the results as JSON to this path")
    p.add_argument("--skip-minimal", action="store_true", help="do not run the minimal loop (no overhead ratio)")
    m = p.add_argument_group("--model_only: titan's Transformer against an independent implementation")
    m.add_argument("--model_only", action="store_true", help="time the model's forward+backward only")
    m.add_argument("--shapes", default="debugmodel,4x1024", help=f"comma-separated, of {', '.join(MODEL_SHAPES)}")
    m.add_argument("--modes", default="eager,compiled", help="comma-separated, of eager, compiled")
    m.add_argument("--reference", default="auto", choices=("auto", "torchtitan", "plain"),
                   help="auto: torchtitan's Llama if it imports, else the plain one in this script")
    m.add_argument("--threads", type=int, default=0,
                   help="intra-op threads for the model steps (default 0: torch's, one per core); 1 is steadier on a "
                        "loaded machine, where a step's threads wait for the slowest")
    m.add_argument("--reference_path", default="",
                   help=f"directories ({os.pathsep}-separated) added to sys.path to import torchtitan from")
    args, overrides = p.parse_known_args(argv)
    if args.model_only:
        bad = [s for s in args.shapes.split(",") if s not in MODEL_SHAPES]
        bad += [s for s in args.modes.split(",") if s not in ("eager", "compiled")]
        if bad or overrides:
            p.error(f"--model_only: unknown shape/mode or argument: {', '.join(bad + overrides)}")
    elif not args.config:
        p.error("--config is required (unless --model_only)")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first step includes one-time costs)")
    return args, overrides


def load_config(args: argparse.Namespace, overrides: list[str]) -> config.Config:
    """The config as titan would run it, with the step count set and validation off (it is not training time)."""
    argv = ["--config", args.config, *overrides, "--training.steps", str(args.warmup + args.steps),
            "--validation.enable", "false"]
    if not any(o.split("=")[0] == "--job.dump_folder" for o in overrides):
        # One folder for all ranks of a torchrun launch (they share its run id and port), a new one per launch.
        launch = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}_{os.environ.get('MASTER_PORT', os.getpid())}"
        argv += ["--job.dump_folder", os.path.join(tempfile.gettempdir(), f"titan_benchmark_{launch}")]
    return config_io.load(argv)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# titan's loop


def run_titan(cfg: config.Config, args: argparse.Namespace) -> tuple[dict, list[float] | None, str | None]:
    """titan's loop, with the minimal loop's steps interleaved when it can do the same work:
    (titan's results, the minimal loop's measured step times or None, why not)."""
    run = build(cfg)
    why_not = "--skip-minimal" if args.skip_minimal else minimal_unavailable(cfg, run)
    if why_not is None:
        minimal = MinimalLoop(cfg, run.model_parts[0].args, run.device, run.grad_accum)
        run.timer = AlternatingTimer(run.device, args.warmup, minimal)
    else:
        run.timer = StepTimer(run.device, sync=True, keep_history=True)  # sync only acts on CUDA
    train(run)
    run.close()  # also releases job.dump_folder's lock
    t = cfg.training
    laps = run.timer.history[args.warmup:]
    steps = [lap["step"] for lap in laps]
    names = [r for r in REGIONS if r != "checkpoint"] + sorted({k for lap in laps for k in lap} - {"step", *REGIONS})
    if any("checkpoint" in lap for lap in laps):
        names.insert(3, "checkpoint")
    per_step = {name: [lap.get(name, 0.0) for lap in laps] for name in names}
    per_step["other"] = [lap["step"] - sum(v for k, v in lap.items() if k != "step") for lap in laps]
    jsonl = Path(cfg.job.dump_folder) / "metrics.jsonl"  # written by rank 0 only
    records = [json.loads(line) for line in jsonl.read_text().splitlines()] if dist.get_rank() == 0 else []
    # Logged during the warm-up (step 1 always is): before the minimal loop's model exists.
    memory = max((r["memory_gib"] for r in records if "memory_gib" in r and r["step"] <= args.warmup),
                 default=float("nan"))
    titan = {
        "world_size": run.dims.world_size,
        "tokens_per_step": t.local_batch_size * run.dims.dp * run.grad_accum * t.seq_len,
        "grad_accum": run.grad_accum,
        "step_time_median_s": median(steps),
        "step_time_mean_s": sum(steps) / len(steps),
        "breakdown_median_s": {name: median(v) for name, v in per_step.items()},
        "breakdown_mean_s": {name: sum(v) / len(v) for name, v in per_step.items()},  # e.g. a save every N steps
        "checkpoint_hook": "checkpoint" in names,
        "peak_memory_gib": memory,
        "memory_kind": ("max allocated in the warm-up, CUDA" if run.device.type == "cuda" else
                        "peak RSS of the process in the warm-up, CPU"),
        "flops_per_token": run.metrics.flops_per_token,
        "peak_flops_per_device": run.metrics.peak_flops,
        "device": device_name(run.device),
    }
    return titan, (run.timer.minimal_times if why_not is None else None), why_not


class AlternatingTimer(StepTimer):
    """titan's step timer that also runs the minimal loop, one step after each of titan's measured steps, so that
    both loops see the same machine (load, clocks, caches) and slow drift cancels out. The minimal loop's time is
    kept out of titan's: the clock restarts after it. Before the measured steps, after titan's warm-up, the minimal
    loop runs its own warm-up steps."""

    def __init__(self, device: torch.device, warmup: int, minimal: MinimalLoop):
        super().__init__(device, sync=True, keep_history=True)
        self.warmup, self.minimal, self.minimal_times = warmup, minimal, []

    def lap(self) -> tuple[float, dict[str, float]]:
        result = super().lap()
        done = len(self.history)
        if done == self.warmup:
            self.minimal.build()
            for _ in range(self.warmup):
                self.minimal.step()
        elif done > self.warmup:
            self.minimal_times.append(self.minimal.step())
        if done >= self.warmup:
            self._last = self._now()
        return result


# ---------------------------------------------------------------------------------------------------------------
# The minimal loop: plain PyTorch, nothing from titan but the model class


class MinimalLoop:
    """A plain training loop with titan's math: same model, per-device batch, dtype, optimizer, clipping and
    compile; one batch made up front, so there is no data loading. `step()` runs one step and returns its time."""

    def __init__(self, cfg: config.Config, model_args, device: torch.device, grad_accum: int):
        self.cfg, self.model_args, self.device, self.grad_accum = cfg, model_args, device, grad_accum

    def build(self) -> None:
        """Built only when titan's warm-up is over, so that titan's warm-up peak memory is titan's alone."""
        t, o = self.cfg.training, self.cfg.optimizer
        torch.manual_seed(t.seed)
        with torch.device(self.device):
            self.model = build_model(self.model_args)
            self.model.init_weights()
        if self.cfg.compile.enable and "model" in self.cfg.compile.components:
            for block in self.model.layers.values():
                block.compile(fullgraph=True)
        impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
        optim_cls = torch.optim.AdamW if o.name == "AdamW" else torch.optim.Adam
        self.optimizer = optim_cls(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                   weight_decay=o.weight_decay, **impl[o.implementation])
        self.dtype = DTYPES[t.mixed_precision_param]
        tokens = torch.randint(self.model_args.vocab_size, (t.local_batch_size, t.seq_len + 1), device=self.device)
        self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]

    def step(self) -> float:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        for _ in range(self.grad_accum):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                logits = self.model(self.inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), self.labels.flatten(0, 1)) / self.grad_accum
            del logits
            loss.backward()
        if self.cfg.training.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def minimal_unavailable(cfg: config.Config, run) -> str | None:
    """Why the minimal loop would not do the same work as titan's, or None."""
    if run.dims.world_size > 1 or run.pipeline is not None:
        return "titan runs on several ranks and the minimal loop is single-device; run without torchrun for it"
    if cfg.activation_checkpoint.mode != "none":
        return "activation checkpointing is on; the minimal loop does not recompute"
    if getattr(getattr(cfg, "float8", None), "enable", False):
        return "float8 is on; the minimal loop does not convert linears"
    return None


# ---------------------------------------------------------------------------------------------------------------
# --model_only: titan's Transformer against an independent implementation of the same math

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
        ref, name = PlainTransformer(a), f"the plain Llama in scripts/benchmark.py ({name})"
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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


MODEL_ONLY_METHOD = ("forward + cross-entropy + backward, fp32, one process; titan's and the reference's steps "
                     "alternate (order swapped each pair) after warm-up; ratio = median of per-pair titan / reference")


# ---------------------------------------------------------------------------------------------------------------
# Report


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} thread(s)"


def summarize(args, cfg: config.Config, titan: dict, minimal_times: list[float] | None, why_not: str | None) -> dict:
    device = titan.pop("device")
    tps = titan["tokens_per_step"] / titan["step_time_mean_s"]
    tps_per_device = tps / titan["world_size"]
    peak = titan["peak_flops_per_device"]
    mfu = 100 * titan["flops_per_token"] * tps_per_device / peak if peak else None
    minimal = None
    ratio = None
    if minimal_times is not None:
        measured = minimal_times
        minimal = {"step_time_median_s": median(measured), "step_time_mean_s": sum(measured) / len(measured),
                   "tokens_per_s": titan["tokens_per_step"] / (sum(measured) / len(measured))}
        ratio = titan["step_time_median_s"] / minimal["step_time_median_s"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": args.config,
        "command": " ".join(sys.argv),
        "device": device,
        "torch_version": torch.__version__,
        "commit": git_commit(),
        "steps": args.steps,
        "warmup": args.warmup,
        "tokens_per_s": tps,
        "tokens_per_s_per_device": tps_per_device,
        "mfu_pct": mfu,
        "flop_convention": FLOP_CONVENTION,
        "peak_flops_source": ("titan/metrics.py:peak_flops (dense datasheet peak for the dtype)" if peak else
                              "n/a: no known peak for this device (CPU or unlisted GPU)"),
        "titan": titan,
        "minimal": minimal,
        "overhead_ratio": ratio,
        "overhead_ratio_unavailable": why_not,
        "method": METHOD,
    }


def fmt_s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:9.2f} ms"


def table(r: dict) -> str:
    t = r["titan"]
    step = t["step_time_median_s"]
    rows = [
        ("config", r["config"]),
        ("device", f"{r['device']}, {t['world_size']} rank(s), torch {r['torch_version']}, commit {r['commit']}"),
        ("steps", f"{r['steps']} measured after {r['warmup']} warm-up, {t['tokens_per_step']:,} tokens/step"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f} total, {r['tokens_per_s_per_device']:,.0f} per device"),
        ("MFU", "n/a (no known peak for this device)" if r["mfu_pct"] is None else
         f"{r['mfu_pct']:.2f} % of {t['peak_flops_per_device'] / 1e12:.1f} TFLOP/s per device"),
        ("FLOPs/token", f"{t['flops_per_token']:.4g}: {r['flop_convention']}"),
        ("step time", f"{fmt_s(step)} (median; regions: median, share of the median step, mean)"),
    ]
    for name, seconds in t["breakdown_median_s"].items():
        share = f"{100 * seconds / step:5.1f} %" if step > 0 else ""
        rows.append((f"  {name}", f"{fmt_s(seconds)}  {share}  (mean {fmt_s(t['breakdown_mean_s'][name]).strip()})"))
    if not t["checkpoint_hook"]:
        rows.append(("  checkpoint", "n/a (the loop times no 'checkpoint' region)"))
    rows.append(("peak memory", f"{t['peak_memory_gib']:.2f} GiB ({t['memory_kind']})"))
    if r["minimal"] is not None:
        rows.append(("minimal loop", f"{fmt_s(r['minimal']['step_time_median_s'])} (median), "
                                     f"{r['minimal']['tokens_per_s']:,.0f} tokens/s"))
        rows.append(("overhead ratio", f"{r['overhead_ratio']:.3f} = titan / minimal median step time"))
    else:
        rows.append(("overhead ratio", f"n/a ({r['overhead_ratio_unavailable']})"))
    rows.append(("measured as", r["method"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.model_only:
        return run_model_only(args)
    setup_logging()  # titan's usual log lines show progress; the table comes at the end
    try:
        cfg = load_config(args, overrides)
        titan, minimal_times, why_not = run_titan(cfg, args)
    except ConfigError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank != 0:
        return 0
    result = summarize(args, cfg, titan, minimal_times, why_not)
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
