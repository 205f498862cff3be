"""What torchao's float8 training needs to run on CPUs and gloo (torch 2.13, torchao 0.18): float8 all-gathers sent as
bytes (gloo has no float8 dtypes) and float8 matmuls kept off oneDNN's reference kernels. Both patch torchao's
float8 op table process-wide, once; titan/parallel/float8.py owns the conversion itself.
"""

from __future__ import annotations

import torch


def allow_float8_all_gather_on_gloo() -> None:
    """gloo has no float8 dtypes (its all-gather raises "Invalid scalar type", torch 2.13), so the all-gathers of the
    float8 TP styles fail on CPU. An all-gather only moves bytes, so send torchao's float8 data viewed as uint8.
    Installed only for CPU meshes: NCCL all-gathers float8 natively and keeps torchao's own handler."""
    from torchao.float8.float8_ops import FLOAT8_OPS_TABLE
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    op = torch.ops._c10d_functional.all_gather_into_tensor.default
    if getattr(FLOAT8_OPS_TABLE[op], "titan_gloo", False):
        return

    def all_gather_as_bytes(aten_op, args, kwargs=None):
        x = args[0]
        if x._scale.numel() != 1:  # torchao's handler asserts this too: a rowwise scale would need gathering
            raise RuntimeError("float8 all-gather needs tensorwise scaling")
        data = aten_op(x._data.contiguous().view(torch.uint8), *args[1:], **(kwargs or {})).view(x._data.dtype)
        return Float8TrainingTensor(data, x._scale, x._orig_dtype, x._linear_mm_config, x._gemm_input_role)

    all_gather_as_bytes.titan_gloo = True
    FLOAT8_OPS_TABLE[op] = all_gather_as_bytes


_CPU_ONEDNN = {"allowed": False}  # float8.cpu_onednn of the last converted model (the handlers are process-wide)


def route_cpu_matmuls_around_onednn(allow_onednn: bool = False) -> None:
    """On CPU, torch._scaled_mm hands float8 matmuls to oneDNN when mkldnn is enabled and the CPU has AMX-INT8; oneDNN
    has no float8 kernel for those Xeons and runs its reference implementation (~1.3 s for a 128x256 @ 256x768
    matmul, `ONEDNN_VERBOSE=1` shows `ref:any`; torch 2.13 and 2.14). With mkldnn off, PyTorch's own kernel
    dequantizes and multiplies in fp32 (2-4 ms, the same result). So torchao's float8 matmul handlers -- forward and
    both backward matmuls go through them -- run with mkldnn off, and only while their inputs are CPU tensors:
    turning it off globally would make bf16 matmuls ~6x slower. Installed once per process; `float8.cpu_onednn`
    (`allow_onednn`) leaves the flag alone."""
    from torchao.float8.float8_ops import FLOAT8_OPS_TABLE

    _CPU_ONEDNN["allowed"] = allow_onednn
    aten = torch.ops.aten
    for op in (aten.mm.default, aten.matmul.default, aten.addmm.default):
        handler = FLOAT8_OPS_TABLE[op]
        if getattr(handler, "titan_cpu", False):
            continue

        def without_onednn(aten_op, args, kwargs=None, _handler=handler):
            if args[-1].device.type != "cpu" or _CPU_ONEDNN["allowed"]:
                return _handler(aten_op, args, kwargs)
            # Not torch.backends.mkldnn.flags(): it also re-sets oneDNN's TF32 mode, which warns on CPU builds.
            previous, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
            try:
                return _handler(aten_op, args, kwargs)
            finally:
                torch.backends.mkldnn.enabled = previous

        without_onednn.titan_cpu = True
        FLOAT8_OPS_TABLE[op] = without_onednn
