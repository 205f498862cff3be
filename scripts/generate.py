"""Generate text from a Hugging Face folder (any registered family) or a titan checkpoint (one process, CPU).

  python scripts/generate.py --hf assets/smollm2 --chat --prompt "What is the capital of France?"
  python scripts/generate.py --checkpoint outputs/sft/checkpoint/step-200 --chat --prompt "Hello"
  python scripts/generate.py --hf assets/smollm2 --prompts titan/assets/data/arithmetic/validation.jsonl

`--prompts` scores a model on a GRPO prompt set instead (JSONL or parquet records with a "prompt" and the columns the
reward functions read): every prompt in the chat template (as --chat picks it, or --chat_template), greedy replies in
batches (KV cache), each reward function of `--rewards` called as GRPO calls it; prints each function's mean reward
(the accuracy, for titan.rewards:math_answer).

`--hf` takes a folder with config.json, safetensors weights and a tokenizer (tokenizer.model, or a Hugging Face
tokenizer.json with the hf extra): what titan.hf.save, scripts/download_assets.py or transformers write.
`--checkpoint` takes a step folder `<dump>/checkpoint/step-N` and rebuilds the
model from the run's resolved config `<dump>/config.toml` (or `--config`): flavor, tokenizer, seq_len, LoRA; adapters
are used as trained, and an adapter-only checkpoint gets its base weights from checkpoint.initial_load_path (then
quantized to NF4 again for a QLoRA run, as training did).

The completion (the decoded new tokens) goes to stdout, everything else to stderr. Greedy unless --temperature > 0.
Decoding uses a KV cache (titan/generation.py): each new token costs one token's forward.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from titan.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flags.py, however this file is loaded
from flags import Parser, check_ranges  # noqa: E402

# Llama 3 style models expect a BOS before plain text; ChatML models (SmolLM2) use <|im_start|> as their "BOS",
# which opens a chat turn and does not belong in front of plain text.
NO_PLAIN_BOS = ("<|im_start|>",)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Models


def from_hf(folder: Path, max_seq_len: int | None):
    from titan import hf
    from titan.data.tokenizer import load_tokenizer
    from titan.models import build_model

    if not (folder / "config.json").is_file():
        raise ConfigError(f"--hf {folder}: no config.json there (not a Hugging Face model folder)")
    args, state = hf.load(folder)
    tokenizer = load_tokenizer(str(folder))
    if max_seq_len:
        args.max_seq_len = max_seq_len
    if tokenizer.vocab_size > args.vocab_size:
        raise ConfigError(f"--hf {folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model "
                          f"{args.vocab_size}")
    with torch.device("meta"):
        model = build_model(args)
    model.to_empty(device="cpu")
    model.init_buffers()
    model.load_state_dict(state, strict=True)
    return model, tokenizer


def _dcp_keys(path: Path, what: str) -> set[str]:
    from titan.checkpoint.state import stored_keys

    return {k.removeprefix("model.") for k in stored_keys(path, what) if k.startswith("model.")}


def _load_dcp(model: torch.nn.Module, path: Path, what: str) -> set[str]:
    """Load the checkpoint's "model" entries that the model has; returns the names loaded.
    One process, no process group: DCP's no_dist mode."""
    import torch.distributed.checkpoint as dcp

    stored = _dcp_keys(path, what)
    state = {k: v for k, v in model.state_dict().items() if k in stored}
    if not state:
        raise ConfigError(f"{what} {path}: no model weights in it that this model has")
    try:
        # The tensors are the model's own parameters: DCP fills them in place (casting e.g. bfloat16 exports).
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException (torch 2.13)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ConfigError(f"{what} {path}: cannot load the model ({lines[-1] if lines else type(e).__name__})"[:300]) \
            from None
    return set(state)


def from_checkpoint(step: Path, config_path: Path | None, max_seq_len: int | None):
    from titan import config_io
    from titan.checkpoint.state import load_initial_weights
    from titan.data.tokenizer import load_tokenizer
    from titan.models import build_model, lora, model_args

    if not step.is_dir():
        raise ConfigError(f"--checkpoint {step}: no such folder (expected <dump_folder>/checkpoint/step-N)")
    config_path = config_path or step.resolve().parent.parent / "config.toml"
    if not config_path.is_file():
        raise ConfigError(f"--checkpoint {step}: no run config at {config_path} (pass --config)")
    cfg = config_io.from_dict(config_io.load_toml(config_path), str(config_path))
    tokenizer = load_tokenizer(cfg.model.tokenizer_path)
    try:
        args = model_args(cfg.model.name, cfg.model.flavor, tokenizer_vocab=tokenizer.vocab_size,
                          max_seq_len=max_seq_len or cfg.training.seq_len)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    with torch.device("meta"):
        model = build_model(args)
        if cfg.lora.enable:
            lora.apply_lora(model, cfg.lora)
    model.to_empty(device="cpu")
    model.init_buffers()
    model.init_weights()
    lora.init_adapters(model)
    wanted = set(model.state_dict())
    if args.tie_embeddings:
        wanted.discard("output.weight")  # the embedding's tensor; DCP stores it once, under the embedding's name
    loaded = set()
    stored = _dcp_keys(step, "--checkpoint")
    if stored and all(lora.is_adapter(k) for k in stored):
        # An adapter-only checkpoint (lora.save_adapter_only): the base is where the run started, read as training
        # reads it.
        if not cfg.checkpoint.initial_load_path:
            raise ConfigError(f"--checkpoint {step}: holds only LoRA adapters and the run had no "
                              f"checkpoint.initial_load_path to take base weights from")
        log(f"base weights from {cfg.checkpoint.initial_load_path} (the checkpoint holds adapters only)")
        with warnings.catch_warnings():  # DCP: "torch.distributed is disabled ... assuming ... a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load_initial_weights([model], cfg.checkpoint)
        loaded = {k for k in wanted if not lora.is_adapter(k)}
    loaded |= _load_dcp(model, step, "--checkpoint")
    missing = sorted(wanted - loaded)
    if missing:
        raise ConfigError(f"--checkpoint {step}: no weights for {missing[0]} ({len(missing)} tensors missing)")
    if cfg.lora.enable and cfg.lora.quantize_base != "none":
        # The adapters were trained on the quantized base: quantize it the same way (QLoRA).
        from titan.config import DTYPES
        from titan.parallel.qlora import quantize_base

        quantize_base(model, cfg.lora, DTYPES[cfg.training.mixed_precision_param])
        log(f"base weights quantized as in training (lora.quantize_base={cfg.lora.quantize_base})")
    model.chat_template = cfg.sft.chat_template  # the template the run trained with, for --chat
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------


def prompt_ids(ns, tokenizer, template_name: str = "auto") -> tuple[list[int], set[int]]:
    """(prompt token ids, ids that end the reply). --chat renders with the template training used (sft.chat_template
    of a --checkpoint's run; for --hf, the folder's own, which titan's export writes as the one training used)."""
    stop = {tokenizer.eos_id}
    if ns.chat:
        from titan.data.chat import chat_template

        template = chat_template(tokenizer, template_name)
        messages = ([{"role": "system", "content": ns.system}] if ns.system else []) + \
            [{"role": "user", "content": ns.prompt}]
        ids, _ = template.render(messages, add_generation_prompt=True)
        return ids, stop | {template.end_id}
    if ns.system:
        raise ConfigError("--system needs --chat")
    bos_token = next((n for n, i in tokenizer.special_tokens.items() if i == tokenizer.bos_id), None)
    bos = ns.bos if ns.bos is not None else bos_token not in NO_PLAIN_BOS  # (encode adds none if there is none)
    return tokenizer.encode(ns.prompt, bos=bos), stop


# Each number flag's accepted range: a bad value is one line naming it (NaN temperatures sampled garbage, a
# max_seq_len of 10**12 failed allocating the RoPE table with a traceback).
RANGES = {"max_new_tokens": (0, 2**20), "temperature": (0.0, 1e4), "top_k": (0, 2**31 - 1), "seed": (0, 2**63 - 1),
          "max_seq_len": (0, 2**20), "batch_size": (1, 2**20)}


def check_flags(ns) -> None:
    check_ranges(ns, RANGES)
    if not 0 < ns.top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1] (got {ns.top_p})")
    check_source(ns)


def check_source(ns) -> None:
    """--hf or --checkpoint (a folder) and --config (a file): what eval.py loads a model from, too."""
    for name in ("hf", "checkpoint"):
        path = getattr(ns, name)
        if path is not None and (not path.strip() or Path(path).is_file()):
            raise ConfigError(f"--{name} {path!r} is not a folder")
    if ns.config is not None and not Path(ns.config).is_file():
        raise ConfigError(f"--config {ns.config!r} is not a file")


def run(ns) -> None:
    from titan.generation import Sampling, generate

    check_flags(ns)
    torch.manual_seed(ns.seed)
    start = time.perf_counter()
    if ns.hf:
        model, tokenizer = from_hf(Path(ns.hf), ns.max_seq_len)
    else:
        model, tokenizer = from_checkpoint(Path(ns.checkpoint), Path(ns.config) if ns.config else None,
                                           ns.max_seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"loaded {n_params / 1e6:.1f} M parameters, vocabulary {tokenizer.vocab_size} in "
        f"{time.perf_counter() - start:.1f}s")
    if ns.prompts:
        return evaluate(ns, model, tokenizer)
    try:
        ids, stop = prompt_ids(ns, tokenizer, ns.chat_template or getattr(model, "chat_template", "auto"))
    except BaseException as e:  # tiktoken panics (a BaseException) on a character whose bytes have no token
        if isinstance(e, (KeyboardInterrupt, SystemExit, ConfigError)):
            raise
        raise ConfigError(f"the tokenizer cannot encode the prompt ({type(e).__name__}: {e})") from None
    if len(ids) >= model.args.max_seq_len:
        raise ConfigError(f"the prompt has {len(ids)} tokens; the model takes at most {model.args.max_seq_len} "
                          f"(--max_seq_len to raise it)")
    generator = torch.Generator().manual_seed(ns.seed)
    start = time.perf_counter()
    sampling = Sampling(ns.temperature, ns.top_k, ns.top_p)
    new = generate(model, [ids], ns.max_new_tokens, sampling, stop_ids=stop, generators=[generator],
                   compiled=ns.compile)[0]
    elapsed = time.perf_counter() - start
    stopped = bool(new) and new[-1] in stop
    text = tokenizer.decode(new[:-1] if stopped else new)
    print(text, flush=True)
    log(f"{len(new)} tokens in {elapsed:.1f}s ({len(new) / max(elapsed, 1e-9):.1f} tokens/s); "
        f"{'stopped at ' + repr(tokenizer.decode([new[-1]])) if stopped else 'reached max_new_tokens or max_seq_len'}")


def evaluate(ns, model, tokenizer) -> None:
    """--prompts: the mean reward of the model's replies to a prompt set, per reward function."""
    from titan import rewards
    from titan.data.chat import as_messages, chat_template
    from titan.data.rl import read_records
    from titan.generation import Sampling, generate

    template = chat_template(tokenizer, ns.chat_template or getattr(model, "chat_template", "auto"))
    records = read_records(Path(ns.prompts), "--prompts")
    functions = rewards.load_reward_functions([r for r in ns.rewards.split(",") if r], [])
    system = [{"role": "system", "content": ns.system}] if ns.system else []
    prompts = [system + as_messages(r.get("prompt"), where, "prompt", "user") for where, r in records]
    stop = sorted({tokenizer.eos_id, template.end_id})
    start, replies = time.perf_counter(), []
    for i in range(0, len(prompts), ns.batch_size):
        ids = [template.render(p, add_generation_prompt=True)[0] for p in prompts[i:i + ns.batch_size]]
        gens = [torch.Generator().manual_seed(ns.seed + i + j) for j in range(len(ids))]
        replies += generate(model, ids, ns.max_new_tokens, Sampling(ns.temperature, ns.top_k, ns.top_p), stop, gens)
    texts = [tokenizer.decode(r[:-1] if r and r[-1] in stop else r) for r in replies]
    columns = {k: [r.get(k) for _, r in records] for k in records[0][1] if k != "prompt"}
    plain = [r["prompt"] for _, r in records]
    shown = [t if isinstance(p, str) else [{"role": "assistant", "content": t}] for p, t in zip(plain, texts)]
    scores = rewards.score(functions, plain, shown, replies, columns, rewards.TrainerState(0, 0))
    log(f"{len(prompts)} prompts, {sum(map(len, replies))} tokens in {time.perf_counter() - start:.1f}s; first "
        f"reply: {texts[0]!r}")
    for f, column in zip(functions, scores.T):
        valid = column[~column.isnan()]
        print(f"{f.path}: mean reward {float(valid.mean()):.4f} over {len(valid)} prompts", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="generate.py", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hugging Face model folder (config.json, safetensors, tokenizer.model or "
                        "tokenizer.json)")
    source.add_argument("--checkpoint", help="titan checkpoint step folder <dump_folder>/checkpoint/step-N")
    parser.add_argument("--config", help="the run's config (default: <dump_folder>/config.toml); --checkpoint only")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt")
    what.add_argument("--prompts", help="score the model on a GRPO prompt set (.jsonl or .parquet; see above)")
    parser.add_argument("--rewards", default="titan.rewards:math_answer",
                        help="--prompts: reward functions, comma-separated \"module:function\"")
    parser.add_argument("--batch_size", type=int, default=32, help="--prompts: prompts generated together")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template "
                        "training used (a --checkpoint run's sft.chat_template; for --hf the folder's own Jinja "
                        "template, else a built-in: ChatML, Qwen3 with thinking off, Llama 3) and stop at the end of "
                        "the reply")
    parser.add_argument("--chat_template", choices=("auto", "tokenizer", "chatml", "qwen3", "llama3"),
                        help="--chat and --prompts: this template instead (as sft.chat_template names them)")
    parser.add_argument("--system", default="", help="a system message (--chat). SmolLM2's own template adds "
                        "'You are a helpful AI assistant named SmolLM, trained by Hugging Face' when none is given")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    parser.add_argument("--top_p", type=float, default=1.0, help="sample among the most likely tokens whose "
                        "probability reaches top_p (nucleus sampling); 1 = all")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoding step (pays off for "
                        "long generations on a GPU; a CPU spends tens of seconds compiling)")
    parser.add_argument("--max_seq_len", type=int, default=0,
                        help="RoPE table length, prompt + reply (default: config.json's max_position_embeddings, "
                             "or the run's training.seq_len)")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help="put the tokenizer's BOS before a plain (non --chat) prompt (default: yes, unless the "
                             "BOS is ChatML's <|im_start|>)")
    ns = parser.parse_args(argv)
    if ns.config and not ns.checkpoint:
        parser.error("--config goes with --checkpoint")
    try:
        run(ns)
    except (ConfigError, ValueError) as e:
        print(f"generate: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
