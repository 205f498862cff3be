"""Downstream evaluation with EleutherAI's lm-evaluation-harness (the `eval` extra): `TitanLM` is an lm-eval model
class over a titan model and tokenizer, so any lm-eval task (multiple choice, perplexity, generation) scores titan's
model directly, with no export. Tasks can come from local files (an lm-eval task YAML whose dataset is a local JSONL,
`include_path`), so evaluation runs offline. Used by scripts/eval.py and by the in-loop evaluation
(`validation.lm_eval_tasks`).

Requests are encoded as lm-eval's own HF model encodes them (the whole context + continuation, the context's part
split off; trailing spaces of the context moved to the continuation; a BOS first where the tokenizer adds one; an
empty context conditioned on the BOS),
so log-likelihoods equal lm-eval's `hf` model on titan's Hugging Face export (tests/test_eval.py: within 1e-4).

Layouts: any in which every rank holds the whole sequence (one process, FSDP, TP): every rank runs the same requests
in the same order, so the model's collectives pair up, and every rank gets the results. Not pipeline or context
parallelism (validation.lm_eval_tasks says so at start).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from titan.errors import ConfigError

logger = logging.getLogger("titan")


def _lm_eval(key: str):
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        raise ConfigError(f'{key} needs lm-evaluation-harness: pip install -e ".[eval]"') from None
    return lm_eval


class _TitanLM:
    """lm-eval's model interface over a titan model (in eval mode for each call) and tokenizer; the class lm-eval
    sees is this plus lm-eval's TemplateLM (`_lm_class`: lm_eval is imported only when it is used)."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.model, self.tokenizer, self._device = model, tokenizer, torch.device(device)
        self.max_length = max_length or model.args.max_seq_len
        self.backend = "causal"
        # As the Hugging Face tokenizer of titan's export encodes text by default (what lm-eval's hf model
        # does): with the BOS, unless there is none or it is ChatML's <|im_start|> (SmolLM2), which opens a turn.
        bos = next((n for n, i in tokenizer.special_tokens.items() if i == tokenizer.bos_id), None)
        self.add_bos = tokenizer.bos_id is not None and bos != "<|im_start|>"

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else add_special_tokens and self.add_bos
        return self.tokenizer.encode(string, bos=bos)

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """log-softmax of the model's logits for one sequence: (len, vocab), fp32."""
        was_training, hidden = self.model.training, getattr(self.model, "output_hidden", False)
        self.model.eval()
        self.model.output_hidden = False  # the chunked training loss has it return hidden states: logits here
        try:
            logits = self.model(torch.tensor([ids], device=self._device))[0]
        finally:
            self.model.train(was_training)
            self.model.output_hidden = hidden
        logits = logits.full_tensor() if isinstance(logits, DTensor) else logits  # loss-parallel TP
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(self.max_length + 1):][:-1]
            n = len(continuation)
            logprobs = self._logprobs(ids)[len(ids) - n:]
            target = torch.tensor(continuation, device=logprobs.device)
            out.append((float(logprobs.gather(1, target[:, None]).sum()),
                        bool((logprobs.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            windows = map(_utils().make_disjoint_window, _utils().get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from titan.generation import generate

        out = []
        for context, kwargs in [r.args for r in requests]:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context)[-(self.max_length - 1):]
            limit = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - len(ids))
            was_training = self.model.training
            self.model.eval()
            try:
                new = generate(self.model, [ids], limit, stop_ids={self.eot_token_id})[0]
            finally:
                self.model.train(was_training)
            text = self.tokenizer.decode([t for t in new if t != self.eot_token_id])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out



def _utils():
    from lm_eval import utils

    return utils


@functools.cache
def _lm_class():
    from lm_eval.api.model import TemplateLM

    return type("TitanLM", (_TitanLM, TemplateLM), {})


def titan_lm(model: torch.nn.Module, tokenizer, max_length: int | None = None, device="cpu", key: str = "lm_eval"):
    """An lm-eval model (lm_eval.api.model.LM) scoring `model` with `tokenizer`."""
    _lm_eval(key)
    return _lm_class()(model, tokenizer, max_length, device)


@functools.cache
def _manager(include_path: str, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None, include_defaults=defaults)


def task_manager(tasks: list[str], include_path: str, key: str):
    """lm-eval's TaskManager that knows `tasks`: the local YAMLs alone when they define them all (indexing lm-eval's
    own ~15,000 task files takes ~20 s), else with lm-eval's tasks; an unknown task is a ConfigError naming `key`."""
    _lm_eval(key)
    manager = _manager(include_path, False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = _manager(include_path, True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"{key}: unknown lm-eval task {unknown[0]!r}" + (f" (no YAML under {include_path} names it)"
                                                                             if include_path else ""))
    return manager


def run_tasks(lm, tasks: list[str], include_path: str = "", limit: int | None = None, key: str = "lm_eval",
              log_samples: bool = False) -> dict:
    """lm-eval's results dict for `tasks` (names, or tasks defined by YAML files under `include_path`)."""
    manager = task_manager(tasks, include_path, key)
    return _lm_eval(key).simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit or None,
                                         log_samples=log_samples, bootstrap_iters=0)


def scores(results: dict) -> dict[str, float]:
    """{"<task>_<metric>": value} of every numeric metric (lm-eval's "acc,none" -> "acc"), for the log line."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for name, value in metrics.items():
            metric, _, variant = name.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not metric.endswith("_stderr"):
                out[f"{task}_{metric}" + ("" if variant in ("", "none") else f"_{variant}")] = float(value)
    return out


class InLoop:
    """validation.lm_eval_tasks: the tasks scored on the training model at every validation, logged beside the
    validation loss (every rank runs them; see the module's note on layouts)."""

    def __init__(self, model: torch.nn.Module, tokenizer, tasks: list[str], include_path: str, limit: int,
                 device):
        self.lm = titan_lm(model, tokenizer, device=device, key="validation.lm_eval_tasks")
        self.tasks, self.include_path, self.limit = tasks, include_path, limit
        task_manager(tasks, include_path, "validation.lm_eval_tasks")  # unknown names fail at start, not at step N

    def __call__(self) -> dict[str, float]:
        return scores(run_tasks(self.lm, self.tasks, self.include_path, self.limit, "validation.lm_eval_tasks"))
