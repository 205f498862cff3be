"""Float8 training with torchao: swaps `nn.Linear` for `Float8Linear` on the meta-device model, before any other
parallelism is applied (titan.parallel.parallelize runs it first).

What it converts: every linear of the transformer blocks (wq/wk/wv/wo, w1/w2/w3) whose dims are multiples of 16,
so its three matmuls (output, grad_input, grad_weight) run in float8 with dynamic scales (one per tensor, or per
row). What it keeps: parameters, gradients and optimizer state stay in high precision; modules named by
`float8.filter_fqns` (default: `output`, the vocab projection, whose logits are sensitive), Mixture-of-Experts
routers' gates (their top-k choice is discrete: a float8 rounding would send tokens to other experts), MLA's
down-projections to the latents (wq_a, wkv_a: every head's keys, values and RoPE key come from them; about 3 % of
a DeepSeek-V3 layer's active weights; DeepSeek's own FP8 recipe converts them) and, with
`auto_filter_small_kn`, linears too small to gain, stay plain `nn.Linear`; MoE experts (`GroupedExperts`) are not
linears and stay in the training dtype. Collectives that change: with FSDP and
`enable_fsdp_float8_all_gather`, the parameter all-gather moves float8 bytes (plus one amax all-reduce per weight,
or one for all weights after each optimizer step with `precompute_float8_dynamic_scale_for_fsdp`); with TP and the
tensorwise recipe, the sequence all-gathers before attention/FFN move float8 activations (an amax all-reduce each).
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from titan.config import Float8
from titan.errors import ConfigError
from titan.models.mla import MLAttention
from titan.models.moe import moe_layers
from titan.models.output_head import OutputHead
from titan.parallel.float8_cpu import route_cpu_matmuls_around_onednn

logger = logging.getLogger("titan")


def _torchao_config(cfg: Float8, fsdp_all_gather: bool, emulate: bool):
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(cfg.recipe_name)
    return dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp_all_gather)


def check(cfg: Float8, device_type: str) -> None:
    """Reject what torchao 0.18 does not support, naming the keys (checked against its code, not guessed)."""
    if not cfg.enable:
        return
    if cfg.enable_fsdp_float8_all_gather and cfg.recipe_name != "tensorwise":
        # Float8LinearConfig asserts: the all-gathered weight carries one scale, so only tensorwise scaling fits.
        raise ConfigError(f"float8.enable_fsdp_float8_all_gather needs float8.recipe_name = tensorwise "
                          f"(got {cfg.recipe_name})")
    if cfg.precompute_float8_dynamic_scale_for_fsdp and not cfg.enable_fsdp_float8_all_gather:
        raise ConfigError("float8.precompute_float8_dynamic_scale_for_fsdp needs "
                          "float8.enable_fsdp_float8_all_gather = true (it precomputes that all-gather's scales)")
    if cfg.auto_filter_small_kn and cfg.recipe_name == "rowwise_with_gw_hp":
        raise ConfigError("float8.auto_filter_small_kn has no thresholds for float8.recipe_name = rowwise_with_gw_hp "
                          "in torchao 0.18; use filter_fqns instead")
    if device_type == "cuda" and not cfg.emulate and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        raise ConfigError(f"float8.enable = true needs a GPU with float8 matmuls (compute capability >= 8.9, this "
                          f"{torch.cuda.get_device_name()} has {major}.{minor}); set float8.emulate = true to emulate "
                          "them in high precision (slower than not using float8)")


def _should_convert(cfg: Float8, module: nn.Module, fqn: str) -> bool:
    """The module filter (True = convert): a linear not named in filter_fqns, with both dims multiples of 16."""
    if not isinstance(module, nn.Linear) or any(f in fqn for f in cfg.filter_fqns):
        return False
    out_features, in_features = module.weight.shape
    # torch._scaled_mm on GPUs needs both dims to be multiples of 16 (the CPU kernel does not, but stay portable).
    return out_features % 16 == 0 and in_features % 16 == 0


def convert(model: nn.Module, cfg: Float8, fsdp_enabled: bool, device_type: str, compiled: bool = False) -> bool:
    """Swap the selected linears of `model` (on the meta device, before TP/FSDP) for torchao's `Float8Linear`.

    Returns whether TP should use torchao's float8 styles: only for the tensorwise recipe. Those styles cast
    activations with one scale per tensor; torchao 0.18 accepts them with a rowwise recipe too, but then silently
    feeds tensorwise-scaled inputs to the rowwise linears, so rowwise runs keep the plain styles (as torchtitan).
    """
    check(cfg, device_type)
    if not cfg.enable:
        return False
    configure_compile(cfg, device_type, compiled)
    emulate = cfg.emulate
    if device_type == "cpu":
        route_cpu_matmuls_around_onednn(allow_onednn=cfg.cpu_onednn)
        if compiled and not cfg.cpu_onednn and not emulate:
            # A compiled graph calls _scaled_mm as an extern kernel, outside any Python context that could keep it
            # off oneDNN; emulation (dequantize, fp32 matmul) is that kernel's own arithmetic, and inductor fuses it.
            emulate = True
            logger.info("float8: on CPU under torch.compile the float8 matmuls are emulated (float8.cpu_onednn = "
                        "true gives them to torch._scaled_mm and oneDNN)")
    from torchao.float8 import _auto_filter_for_recipe, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    # FSDP float8 all-gather only means something when FSDP shards the weights; without FSDP the weight subclass
    # would only add overhead (torchtitan also turns it on only when FSDP is enabled).
    all_gather = cfg.enable_fsdp_float8_all_gather and fsdp_enabled
    if cfg.auto_filter_small_kn:
        # torchao's H100-measured thresholds on the weight's (N=out, K=in): tensorwise skips K <= 4096 and N <= 1024;
        # rowwise skips N <= 2048, K <= 1024, or N <= 4096 and K <= 2048 -- below them the amax/cast kernels cost
        # more than the float8 matmul saves. It also applies filter_fqns and the multiple-of-16 rule.
        filter_fn = _auto_filter_for_recipe(cfg.recipe_name, cfg.filter_fqns)
    else:
        filter_fn = partial(_should_convert, cfg)
    keep = {id(moe.router.gate) for _, moe in moe_layers([model])}
    keep |= {id(m.wq_a) for m in model.modules() if isinstance(m, MLAttention) and m.wq_a is not None}
    keep |= {id(m.wkv_a) for m in model.modules() if isinstance(m, MLAttention)}
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: id(m) not in keep and filter_fn(m, fqn),
                               config=_torchao_config(cfg, all_gather, emulate))

    converted = sum(isinstance(m, Float8Linear) for m in model.modules())
    kept = [n for n, m in model.named_modules() if type(m) in (nn.Linear, OutputHead)]
    how = "emulated" if emulate else "_scaled_mm"
    if device_type == "cpu" and not emulate:
        how += ", oneDNN allowed" if cfg.cpu_onednn else ", oneDNN bypassed"
    if cfg.enable_fsdp_float8_all_gather:
        how += ", FSDP float8 all-gather" if all_gather else ", float8 all-gather unused: no FSDP"
    logger.info(f"float8: {cfg.recipe_name} recipe on {converted} linears ({how}); kept in high precision: "
                f"{', '.join(kept) if kept else 'none'}")
    if converted == 0:
        logger.warning("float8: no linear was converted (see float8.filter_fqns / float8.auto_filter_small_kn)")
    return cfg.recipe_name == "tensorwise"


def configure_compile(cfg: Float8, device_type: str, compiled: bool) -> None:
    """What float8 needs from torch.compile, and a word when it runs without it.

    Rowwise recipes under compile: inductor fuses the amax, the scale and the cast into one kernel and by default
    keeps the intermediate in higher precision than eager does, which with rowwise scales after an RMSNorm gives
    NaN (PyTorch issue 150859, open in torch 2.13); `emulate_precision_casts` makes it round as eager does
    (torchtitan sets it for rowwise too). A process-wide inductor setting, set once and left on: it only makes
    compiled casts bit-faithful. Eager float8 runs the amax, scale and cast as separate kernels, which usually costs
    more than float8's matmuls save: said once at start, as a warning on a GPU. Only a GPU shows the NaN and the
    speed (scripts/gpu_check.py's float8 lines)."""
    if compiled and cfg.recipe_name.startswith("rowwise"):
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True
        logger.info("float8: rowwise under torch.compile: torch._inductor.config.emulate_precision_casts = True "
                    "(PyTorch issue 150859)")
    elif not compiled:
        log = logger.warning if device_type == "cuda" else logger.info
        log("float8: running eager (compile.enable = false): the casts to float8 run as separate kernels and are "
            "usually slower than bf16 without float8; set compile.enable = true for float8's speed-up")


class TPStyles(NamedTuple):
    colwise: type
    rowwise: type
    prepare_input: type


def tp_styles(module: nn.Module, float8: bool) -> TPStyles:
    """The TP style classes for `module`: torchao's float8 ones when `float8` and every linear inside `module` is a
    Float8Linear, else the plain ones. A plain (filtered) linear must not receive a float8 input, and a
    `PrepareFloat8ModuleInput` casts once for all the linears it feeds."""
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    plain = TPStyles(ColwiseParallel, RowwiseParallel, PrepareModuleInput)
    if not float8:
        return plain
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears and all(isinstance(m, Float8Linear) for m in linears):
        return TPStyles(Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput)
    return plain


def precompute_scales(model_parts: list[nn.Module], cfg: Float8) -> None:
    """After `optimizer.step()`: the float8 scales of all FSDP-sharded weights from one all-reduce of their amaxes,
    instead of one per weight during the next forward's all-gathers. A no-op unless configured (and without FSDP
    float8 all-gather, torchao finds no weights to do it for)."""
    if cfg.enable and cfg.precompute_float8_dynamic_scale_for_fsdp:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        for part in model_parts:
            precompute_float8_dynamic_scale_for_fsdp(part)


def metrics_header(cfg: Float8) -> str:
    """For the metrics log header: says float8 is on and that MFU is still counted against the bf16 peak."""
    if not cfg.enable:
        return ""
    return f"float8 {cfg.recipe_name}{' (emulated)' if cfg.emulate else ''}, MFU against the bf16 peak"


def mfu_dtype(cfg: Float8, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype whose peak MFU is measured against: titan.metrics.peak_flops maps 1-byte dtypes to the bf16 peak,
    so float8 runs report bf16-equivalent MFU, comparable with a bf16 run (even when the parameters are fp32)."""
    return torch.float8_e4m3fn if cfg.enable else param_dtype
