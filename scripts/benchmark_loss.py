#!/usr/bin/env python
"""Benchmark the chunked loss (titan/objectives/token.py:HeadLoss) against the whole-logits loss (docs/performance.md,
"The loss at a large vocabulary").

    python scripts/benchmark_loss.py [--vocab 151936] [--dim 1024] [--tokens 2048] [--chunk_tokens 256] [--threads N]
                                     [--json F]

One output projection (dim -> vocab, no bias) and the summed cross-entropy of `tokens` hidden states, forward and
backward, three ways: with the logits whole, in chunks of `chunk_tokens` tokens each recomputed in backward (a head
that LoRA, float8 or tensor parallelism changes), and in fused chunks whose gradients are computed in forward (a plain
head: titan/models/output_head.py). It reports each one's peak memory above its inputs and their gradient buffers,
which a model holds anyway (CPU: the allocator's own events from torch.profiler, so the figure does not depend on the
machine's load; CUDA: max_memory_allocated), their wall time after one warm-up run each, and that loss and gradients
agree with the whole logits' (relative difference). Target (issue 26): at a 151,936-token vocabulary the chunked
peak is at least 4x lower, and the fused chunks take no longer than the whole logits.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_common import device_name, git_commit  # noqa: E402
from flags import NEW_FILE, Parser  # noqa: E402

from titan.data.pretrain import IGNORE_INDEX  # noqa: E402
from titan.errors import ConfigError  # noqa: E402
from titan.models.output_head import OutputHead  # noqa: E402
from titan.objectives import HeadLoss  # noqa: E402


def peak_bytes(fn, device: torch.device) -> tuple[int, float]:
    """(peak bytes allocated while `fn` runs, above what was allocated before; seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, start = torch.cuda.memory_allocated(), time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, time.perf_counter() - start
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    fn()  # timed without the profiler, whose bookkeeping costs more than small ops
    seconds = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):  # allocations (+) and frees (-), in order
        live += event.nbytes()
        peak = max(peak, live)
    return peak, seconds


def measure(vocab: int, dim: int, tokens: int, chunk_tokens: int, device: str = "cpu",
            dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    head = OutputHead(dim, vocab, bias=False).to(device, dtype)
    hidden = torch.randn(1, tokens, dim, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    labels[:, ::7] = IGNORE_INDEX
    result, grads = {}, {}
    for name, loss_fn in (("whole", lambda: HeadLoss()(head(hidden), labels)),
                          ("chunked", lambda: HeadLoss(head, chunk_tokens)(hidden, labels)),
                          ("fused", lambda: HeadLoss(head, chunk_tokens, fused=True)(hidden, labels))):
        out = {}

        def step(loss_fn=loss_fn, out=out):  # bound now: the loop moves on
            for t in (hidden, head.weight):  # gradient buffers in place, as a model's are after its first step
                t.grad = torch.zeros_like(t) if t.grad is None else t.grad.zero_()
            loss = loss_fn()
            loss.backward()
            out["loss"] = loss.detach()

        step()  # warm-up
        peak, seconds = peak_bytes(step, device)
        result[name] = {"peak_bytes": peak, "seconds": seconds, "loss": out["loss"].item()}
        grads[name] = (hidden.grad.clone(), head.weight.grad.clone())
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    for name in ("chunked", "fused"):
        loss, whole = result[name]["loss"], result["whole"]["loss"]
        result[name].update(loss_rel_diff=abs(loss - whole) / abs(whole),
                            grad_rel_diff=max(rel(a, b) for a, b in zip(grads[name], grads["whole"])))
    result.update(
        vocab=vocab, dim=dim, tokens=tokens, chunk_tokens=chunk_tokens, dtype=str(dtype).removeprefix("torch."),
        device=device.type, device_name=device_name(device), torch_version=torch.__version__, commit=git_commit(),
        date=time.strftime("%Y-%m-%d", time.gmtime()),
        peak_ratio=result["whole"]["peak_bytes"] / result["chunked"]["peak_bytes"],
        fused_peak_ratio=result["whole"]["peak_bytes"] / result["fused"]["peak_bytes"],
        loss_rel_diff=max(result[n]["loss_rel_diff"] for n in ("chunked", "fused")),
        grad_rel_diff=max(result[n]["grad_rel_diff"] for n in ("chunked", "fused")))
    return result


# Each number flag's range: the whole logits (vocab x tokens floats) must be allocatable, 10**12 of anything is not.
RANGES = {"vocab": (1, 2**20), "dim": (1, 2**16), "tokens": (1, 2**20), "chunk_tokens": (1, 2**20),
          "threads": (0, 1024)}


def check_device(ns) -> None:
    try:
        device = torch.device(ns.device)
    except RuntimeError:
        raise ConfigError(f"--device {ns.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    cuda_here = device.type == "cuda" and (device.index or 0) < torch.cuda.device_count()
    if device.type != "cpu" and not cuda_here:
        raise ConfigError(f"--device {ns.device!r}: not a CPU or a CUDA device of this machine")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="benchmark_loss.py", description=__doc__.split("\n\n")[0], ranges=RANGES,
                    paths={"json": NEW_FILE}, check=check_device)
    parser.add_argument("--vocab", type=int, default=151936, help="in [1, 2**20]")
    parser.add_argument("--dim", type=int, default=1024, help="in [1, 2**16]")
    parser.add_argument("--tokens", type=int, default=2048, help="in [1, 2**20]")
    parser.add_argument("--chunk_tokens", type=int, default=256, help="in [1, 2**20]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=0, help="torch's intra-op threads (0: its default)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.vocab, args.dim, args.tokens, args.chunk_tokens, args.device, getattr(torch, args.dtype))
    mib = 2**20
    print(f"loss of {r['tokens']} tokens, vocab {r['vocab']:,}, dim {r['dim']}, {r['dtype']} on {r['device']}:")
    for name in ("whole", "chunked", "fused"):
        label = name if name == "whole" else f"{name} ({r['chunk_tokens']} tokens)"
        print(f"  {label:<24} peak {r[name]['peak_bytes'] / mib:10.1f} MiB   {r[name]['seconds']:.3f} s")
    print(f"  peak whole / chunked = {r['peak_ratio']:.2f}, / fused = {r['fused_peak_ratio']:.2f}; loss differs by "
          f"{r['loss_rel_diff']:.1e}, gradients by {r['grad_rel_diff']:.1e} (relative, at most)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
