"""GRPO's rollout phase: every `grpo.num_iterations` steps, sample `grpo.num_generations` completions of this rank's
share of the step's prompts from the current policy, score them with the reward functions, normalise the rewards
within each prompt's group into advantages, and lay them out as the step's micro-batches; the loop trains on those
micro-batches for num_iterations steps (titan/objectives/grpo.py is the loss).

Generation runs on a single-device copy of the policy (`Sampler`), refreshed from the training model before each
rollout: sharded parameters (FSDP, HSDP, TP, EP) are gathered whole (one all-gather per tensor; after the first
refresh only the trainable ones: LoRA's adapters, which the copy keeps as adapters), NF4 base weights are
dequantized. Every rank thus generates with the whole model and needs its memory once more; the training model and
its parallel layout stay untouched. Each completion draws its random numbers from its own generator, seeded by
(training.seed, the prompt's position in the global sample order, its index in the group), so the samples do not
depend on how the ranks split the prompts; set grpo.generation_batch_size to a multiple of num_generations that
divides every layout's share for bit-identical rollouts (the batch a row is computed in can change its last bits).

The state (for checkpoints) is the prompt order's position and, between the steps of one rollout (num_iterations >
1), the rollout itself, gathered so that every rank holds the same copy (DCP keeps one).
"""

from __future__ import annotations

import io
import logging
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from titan import models, rewards
from titan.config import GRPO, LoRA, Training
from titan.data.chat import ChatTemplate, example, pad_rows
from titan.data.order import GlobalOrderSampler, _mix64, collate_rows
from titan.data.pretrain import IGNORE_INDEX
from titan.data.rl import Prompt
from titan.errors import ConfigError
from titan.generation import Sampling, generate
from titan.lifecycle import agree
from titan.models import lora
from titan.objectives.grpo import group_advantages
from titan.objectives.token import token_logps
from titan.parallel.process_group import gather_objects

logger = logging.getLogger("titan")
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


class Sampler:
    """The policy's single-device copy that generates (same family, LoRA adapters if the policy has them)."""

    def __init__(self, args, lora_cfg: LoRA, device: torch.device, dtype: torch.dtype):
        with torch.device("meta"):
            model = models.build_model(args)
            if lora_cfg.enable:
                lora.apply_lora(model, lora_cfg)
        model.to_empty(device=device)
        for param in model.parameters():  # parameters only: the RoPE table stays complex64
            param.data = param.data.to(dtype)
        self.model = model.eval().requires_grad_(False)
        self.model.init_buffers(device)
        self.synced = False

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's weights in (all ranks call this: sharded tensors are gathered collectively). The frozen
        parameters (LoRA's base) are copied the first time only."""
        frozen = {_WRAPPERS.sub("", n) for n, p in policy.named_parameters() if not p.requires_grad}
        mine = self.model.state_dict()
        for name, value in get_model_state_dict(policy).items():
            if self.synced and name in frozen:
                continue
            if isinstance(value, DTensor):  # dequantize this rank's part first: NF4 has no all-gather of its own
                local = lora.dequantize(value.to_local())
                value = DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                                           shape=value.shape, stride=value.stride()).full_tensor()
            mine[name].copy_(lora.dequantize(value))
        self.synced = True


@dataclass
class Rollout:
    """One rollout of this rank: its micro-batches and what the log reports about it."""

    group: int  # (step - 1) // num_iterations
    rows: list[dict]  # per completion: input, label, advantage (and old_logps)
    stats: dict


def overlong_penalty(completions: list[list[int]], cfg: GRPO) -> torch.Tensor:
    """DAPO's soft overlong punishment (its eq. 13; TRL's get_soft_overlong_punishment) in [-1, 0]: 0 up to
    max_completion_length - overlong_buffer_len tokens, then falling linearly to -1 at max_completion_length
    (weighted by overlong_penalty_factor, like a reward function's weight)."""
    limit, buffer = cfg.max_completion_length, cfg.overlong_buffer_len
    lengths = torch.tensor([float(len(c)) for c in completions])
    return ((limit - buffer - lengths) / buffer).clamp(-1.0, 0.0)


def seeded_generator(seed: int, position: int, index: int) -> torch.Generator:
    """The generator of completion `index` of the prompt at global sample position `position`."""
    key = _mix64(np.array([(seed << 40) ^ (position << 8) ^ index], dtype=np.uint64))[0]
    return torch.Generator().manual_seed(int(key) & (2**63 - 1))


class Rollouts:
    """The GRPO data source. `prepare(step)` (the loop calls it before taking the step's batches) generates when the
    step starts a new rollout; `next()` hands out the rollout's micro-batches, grad_accum per step, the same ones
    for each of the num_iterations steps."""

    def __init__(self, cfg: GRPO, training: Training, prompts: list[Prompt], template: ChatTemplate, tokenizer,
                 policy: torch.nn.Module, sampler: Sampler, functions: list[rewards.RewardFunction], dp_mesh,
                 grad_accum: int, autocast, loss_context, compiled: bool = False):
        self.cfg, self.training, self.prompts, self.tokenizer = cfg, training, prompts, tokenizer
        self.policy, self.sampler, self.functions, self.dp_mesh = policy, sampler, functions, dp_mesh
        self.autocast, self.loss_context, self.grad_accum = autocast, loss_context, grad_accum
        self.compiled = compiled  # the generator's decoding step through torch.compile
        self.stop_ids = sorted({tokenizer.eos_id, template.end_id})
        self.prompts_per_rank = training.local_batch_size * grad_accum // cfg.num_generations  # (checked in build)
        self.order = GlobalOrderSampler(len(prompts), self.prompts_per_rank, training.seed,
                                        dp_mesh.get_local_rank(), dp_mesh.size())
        self.rollout: Rollout | None = None
        self.cursor = 0
        self.generation_s = self.prepared_at = 0.0

    # -- the loop's side ------------------------------------------------------------------------------------------

    def prepare(self, step: int) -> None:
        """Make the step's rollout, unless the buffered one is the step's (num_iterations > 1)."""
        group = (step - 1) // self.cfg.num_iterations
        self.generation_s = 0.0
        if self.rollout is None or self.rollout.group != group:
            start = time.perf_counter()
            self.rollout = self._rollout(group, step)
            self.generation_s = time.perf_counter() - start
        self.cursor = 0
        self.prepared_at = time.perf_counter()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        b = self.training.local_batch_size
        batch = collate_rows(self.rollout.rows[self.cursor * b:(self.cursor + 1) * b])
        self.cursor += 1
        return batch

    def metrics(self) -> dict[str, float]:
        """The rollout's figures, its generation time (0 on steps that reuse it) and the training time since."""
        if self.rollout is None:
            return {}
        return {**self.rollout.stats, "generation_s": self.generation_s,
                "training_s": time.perf_counter() - self.prepared_at}

    # -- one rollout ----------------------------------------------------------------------------------------------

    def _rollout(self, group: int, step: int) -> Rollout:
        position = self.order.position + self.order.dp_rank * self.prompts_per_rank  # of this rank's first prompt
        ids = next(iter(self.order))
        prompts = [self.prompts[i] for i in ids]
        k = self.cfg.num_generations
        self.sampler.sync(self.policy)
        gens = [seeded_generator(self.training.seed, position + j, i) for j in range(len(prompts)) for i in range(k)]
        flat = [p for p in prompts for _ in range(k)]
        completions, entropy = self._generate([p.ids for p in flat], gens)
        truncated = [not c or c[-1] not in self.stop_ids for c in completions]
        scores, names = self._score(flat, completions, truncated, step)
        total = rewards.combine(scores, self._weighted())
        advantages = group_advantages(total, k, self.cfg.scale_rewards)
        rows = []
        for p, c, cut, adv in zip(flat, completions, truncated, advantages.tolist()):
            inp, label = example(p.ids + c, [False] * len(p.ids) + [True] * len(c), self.training.seq_len)
            if cut and self.cfg.mask_truncated_completions:  # overlong filtering: nothing of it is learnt
                label = torch.full_like(label, IGNORE_INDEX)
            row = pad_rows([(inp, label)], self.training.seq_len, self.tokenizer.eos_id)[0]
            rows.append({**row, "advantage": torch.tensor(adv)})
        if self.cfg.num_iterations > 1:
            self._old_logps(rows)
        stats = self._stats(scores, names, total, completions, truncated, entropy)
        return Rollout(group, rows, stats)

    def _generate(self, prompt_ids: list[list[int]], gens) -> tuple[list[list[int]], list[float]]:
        sampling = Sampling(self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)
        size = self.cfg.generation_batch_size or len(prompt_ids)
        out, entropy = [], [0.0, 0.0]
        for start in range(0, len(prompt_ids), size):
            stats = {}
            out += generate(self.sampler.model, prompt_ids[start:start + size], self.cfg.max_completion_length,
                            sampling, self.stop_ids, gens[start:start + size], self.compiled, stats)
            entropy = [entropy[0] + stats["entropy_sum"], entropy[1] + stats["tokens"]]
        return out, entropy

    def _weighted(self) -> list[rewards.RewardFunction]:
        """The reward functions plus, when on, the soft overlong punishment (its weight the penalty factor)."""
        extra = [rewards.RewardFunction("overlong", None, self.cfg.overlong_penalty_factor)] \
            if self.cfg.overlong_buffer_len else []
        return self.functions + extra

    def _score(self, flat: list[Prompt], completions: list[list[int]], truncated: list[bool], step: int):
        """(completions, functions) rewards, NaN where a function returned None; every rank stops if one fails."""
        texts = [self.tokenizer.decode(c[:-1] if not cut else c) for c, cut in zip(completions, truncated)]
        shown = [t if isinstance(p.prompt, str) else [{"role": "assistant", "content": t}] for p, t in zip(flat, texts)]
        columns = {name: [p.columns[name] for p in flat] for name in flat[0].columns}
        error, scores = None, None
        try:
            scores = rewards.score(self.functions, [p.prompt for p in flat], shown, completions, columns,
                                   rewards.TrainerState(step, self.training.steps))
        except ConfigError as e:
            error = str(e)
        agree(error)  # a reward function that fails on one rank stops them all, with its one line
        names = [f.name for f in self.functions]
        if self.cfg.overlong_buffer_len:
            scores = torch.cat([scores, overlong_penalty(completions, self.cfg).unsqueeze(1)], dim=1)
            names.append("overlong")
        return scores, names

    @torch.no_grad()
    def _old_logps(self, rows: list[dict]) -> None:
        """The sampling policy's log-probability of every completion token (num_iterations > 1: the ratio's
        denominator in the later steps), from the training model as it is now, micro-batch by micro-batch."""
        b = self.training.local_batch_size
        for start in range(0, len(rows), b):
            batch = collate_rows(rows[start:start + b])
            with self.loss_context(), self.autocast():
                logps = token_logps(self.policy(batch["input"]), batch["label"])
            for row, lp in zip(rows[start:start + b], logps):
                row["old_logps"] = lp.float().cpu()

    def _stats(self, scores, names, total, completions, truncated, entropy) -> dict[str, float]:
        """Means over the step's completions on every data-parallel rank (two all-reduces): reward (weighted sum)
        and each function's reward, their std, completion lengths, the share of truncated ones, entropy."""
        cols = torch.cat([total.unsqueeze(1), scores], dim=1).double()  # fp64 sums: the same for any split
        valid = ~cols.isnan()
        clean = cols.nan_to_num(0.0)
        lengths = torch.tensor([float(len(c)) for c in completions], dtype=torch.float64)
        sums = torch.cat([clean.sum(0), (clean ** 2).sum(0), valid.sum(0).double(),
                          torch.tensor([lengths.sum(), float(len(lengths)), float(sum(truncated)), *entropy],
                                       dtype=torch.float64)])
        device = next(self.policy.parameters()).device
        sums = _all_reduce(sums.to(device, torch.float64), self.dp_mesh, "sum").cpu()
        longest = _all_reduce(lengths.max().to(device), self.dp_mesh, "max").item()
        n = len(names) + 1
        total_sum, square, count = sums[:n], sums[n:2 * n], sums[2 * n:3 * n]
        length_sum, n_completions, n_cut, entropy_sum, n_tokens = sums[3 * n:].tolist()
        out = {}
        for i, name in enumerate(["reward", *[f"reward/{x}" for x in names]]):
            c = float(count[i])
            mean = float(total_sum[i]) / c if c else math.nan
            var = (float(square[i]) - c * mean * mean) / (c - 1) if c > 1 else math.nan
            out[name], out[f"{name}_std"] = mean, math.sqrt(max(var, 0.0))
        out.update(completion_length=length_sum / n_completions, completion_length_max=longest,
                   truncated_ratio=n_cut / n_completions, entropy=entropy_sum / max(n_tokens, 1.0))
        return out

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The prompt order's position (the same on every rank), and between the steps of one rollout the rollout
        of every rank, in rank order (so any layout can continue it)."""
        buffer = b""
        if self.rollout is not None and self.cfg.num_iterations > 1:
            every = gather_objects(self.rollout.rows, self.dp_mesh.get_group())
            stream = io.BytesIO()
            torch.save({"group": self.rollout.group, "rows": [r for rank in every for r in rank],
                        "stats": self.rollout.stats}, stream)
            buffer = stream.getvalue()
        return {**self.order.state_dict(), "rollout": buffer}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        if state.get("rollout"):
            saved = torch.load(io.BytesIO(state["rollout"]), weights_only=False)
            per_rank = self.training.local_batch_size * self.grad_accum
            rank = self.dp_mesh.get_local_rank()
            self.rollout = Rollout(saved["group"], saved["rows"][rank * per_rank:(rank + 1) * per_rank],
                                   saved["stats"])


def _all_reduce(t: torch.Tensor, mesh, op: str) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=mesh.get_group())
    return t
