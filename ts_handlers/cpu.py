"""Which precisions this CPU runs natively and fast, asked the same way at build and at load.

A reduced-precision graph is only worth serving where the CPU has kernels for it: bfloat16
without AVX512_BF16/AMX is emulated (4.5x slower than float32 on an AVX2 Zen 3), and int8
through ``torch._int_mm`` has no fast kernel without VNNI (6x slower there). The build records
the instruction sets it measured on; the handler asks :func:`serving_precision` at load which
graph to run, and falls back to the archive's float32 graph where the answer is "not fast".

Imports only torch: a served archive needs this module, and nothing of the build.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# The instruction sets that decide reduced-precision speed on x86, asked without a compiler.
_ISA_CHECKS: dict[str, Callable[[], bool]] = {
    "AVX2": lambda: torch.cpu._is_avx2_supported(),
    "AVX512": lambda: torch.cpu._is_avx512_supported(),
    "AVX512_BF16": lambda: torch.cpu._is_avx512_bf16_supported(),
    "AVX512_VNNI": lambda: torch.cpu._is_vnni_supported(),
    "AMX_TILE": lambda: torch.cpu._is_amx_tile_supported(),
}

# The least speed-up over float32, in every case the build timed, for which a reduced graph is
# served on a CPU like the build's. The build times each graph for a few seconds on a machine
# that may be busy, and a smaller gain is within that noise: on the AVX2 Zen 3 the same int8
# MiniLM archive timed 1.11x (short) and 1.03x (long) at build, then served 0.71x float32's
# throughput on long sentences at 16 clients (docs/performance.md).
MIN_SPEEDUP = 1.2

# The int8 kernels precision.py can build a graph with, and what each needs to be fast.
FBGEMM = "fbgemm"  # quantized::linear_dynamic, prepacked weights: AVX2 and AVX-512 (and VNNI)
INT_MM = "int_mm"  # torch._int_mm, int8 x int8 -> int32: fast only with VNNI or AMX
# ONNX Runtime's MatMulInteger on MLAS (save_mode onnx): u8 x s8 kernels for AVX2 and AVX-512.
ONNXRUNTIME_MLAS = "onnxruntime_mlas"


def instruction_sets() -> dict[str, Any]:
    """This CPU's name for torch (``AVX2``, ``AVX512``, ...) and each instruction set's presence."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{name: bool(check()) for name, check in _ISA_CHECKS.items()},
    }


def fast_here(precision: str, kernel: str | None = None) -> tuple[bool, str]:
    """Whether this CPU runs ``precision`` (a dtype, or ``dynamic_int8`` with ``kernel``)
    natively, and the reason in words."""
    isa = instruction_sets()
    cpu = isa["cpu_capability"]
    if precision == "float32":
        return True, "float32"
    if precision == "bfloat16":
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True, f"this CPU ({cpu}) has native bfloat16"
        return False, f"this CPU ({cpu}) has no native bfloat16 (AVX512_BF16 or AMX)"
    if precision == "float16":
        if torch.ops.mkldnn._is_mkldnn_fp16_supported():
            return True, f"this CPU ({cpu}) has native float16"
        return False, f"this CPU ({cpu}) has no native float16 (AVX512_FP16 or AMX)"
    if precision == "dynamic_int8" and kernel == FBGEMM:
        if "fbgemm" in torch.backends.quantized.supported_engines and isa["AVX2"]:
            return True, f"this CPU ({cpu}) runs fbgemm's int8 kernels"
        return False, f"this CPU ({cpu}) has no fbgemm int8 kernels (they need AVX2)"
    if precision == "dynamic_int8" and kernel == ONNXRUNTIME_MLAS:
        if isa["AVX2"]:
            return True, f"this CPU ({cpu}) runs ONNX Runtime's MLAS int8 kernels"
        return False, f"this CPU ({cpu}) has no AVX2 for ONNX Runtime's MLAS int8 kernels"
    if precision == "dynamic_int8" and kernel == INT_MM:
        if isa["AVX512_VNNI"] or isa["AMX_TILE"]:
            return True, f"this CPU ({cpu}) has int8 dot products (VNNI or AMX) for torch._int_mm"
        return False, f"this CPU ({cpu}) has no VNNI or AMX, and torch._int_mm is slow without"
    return False, f"{precision} with kernel {kernel!r} is unknown to this version"


def serving_precision(precision_metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Which graph of an archive to serve here: its own, or its float32 fallback.

    ``precision_metadata`` is what the build recorded (``precision`` in the model's metadata;
    None for a float32 archive). The reduced graph is served where this CPU runs it natively,
    unless the build measured it slower than float32 on a CPU with these same instruction sets.
    """
    if not precision_metadata:
        return {"archive": "float32", "serving": "float32", "reason": "a float32 archive"}
    name = precision_metadata["name"]
    choice = {"archive": name}
    if precision_metadata.get("kernel"):
        choice["kernel"] = precision_metadata["kernel"]
    fast, reason = fast_here(name, precision_metadata.get("kernel"))
    speed = precision_metadata.get("speed") or {}
    if fast and speed.get("instruction_sets") == instruction_sets():
        slower = {case: figures["ratio"] for case, figures in speed.get("cases", {}).items()}
        slower = {case: ratio for case, ratio in slower.items() if ratio < MIN_SPEEDUP}
        if slower:
            fast = False
            reason = (
                f"the build measured it under {MIN_SPEEDUP:g}x float32 on a CPU like this one ("
            ) + (", ".join(f"{case} {ratio:.2f}x" for case, ratio in sorted(slower.items())) + ")")
    serving = name if fast else "float32"
    if not fast and not precision_metadata.get("float32_file"):
        serving, reason = name, f"{reason}; the archive carries no float32 graph"
    return {**choice, "serving": serving, "reason": reason}
