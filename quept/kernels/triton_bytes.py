"""Byte-count model of the Triton elastic-linear kernels: what each launch must read and write.

Compulsory traffic only (every tensor byte moved once between HBM and the chip); re-reads that
hit L2 (the prefill kernel reads a weight tile once per row tile) are not counted. A decode step
is memory-bound, so `bytes / bandwidth` is its roofline time and the ratio of bytes to a dense
fp16 matmul's bytes is the speed-up the kernel can reach. Pure Python: no torch or triton needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM, HBM3
AFFINE_BYTES = 2 + 2  # fp16 scale + fp16 min per group per width
ADAPTER_BYTES = 2  # fp16 adapters

# (name, N out_features, K in_features) of the linears of one decoder block
MODEL_SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "llama-2-7b": [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096),
                   ("o_proj", 4096, 4096), ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096),
                   ("down_proj", 4096, 11008)],
    "llama-3-8b": [("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096),
                   ("o_proj", 4096, 4096), ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096),
                   ("down_proj", 4096, 14336)],
}
MODEL_LAYERS = {"llama-2-7b": 32, "llama-3-8b": 32}


@dataclass(frozen=True)
class Traffic:
    """Bytes one kernel launch reads and writes."""

    kernel: str
    read: int
    written: int

    @property
    def total(self) -> int:
        return self.read + self.written


def ideal_speedup(bits: int, group_size: int) -> float:
    """16 / (b + affine bits per weight): the weight-bytes ratio to fp16, adapters and activations left out."""
    return 16.0 / (bits + 8.0 * AFFINE_BYTES / group_size)


def fp16_matmul_traffic(m: int, n: int, k: int) -> list[Traffic]:
    """torch.matmul of fp16 x [M, K] by an fp16 weight [N, K]ᵀ."""
    return [Traffic("fp16_matmul", 2 * (n * k + m * k), 2 * m * n)]


def decode_traffic(
    m: int, n: int, k: int, bits: int, group_size: int, rank: int, act_bytes: int = 2, split_k: int = 1,
    widths_present: int = 1, bias: bool = False,
) -> list[Traffic]:
    """Decode path: the GEMV launch (planes 0..b-1, affines, shrink of A[:r]) and its split-K epilogue.

    For a mixed batch `bits` is the widest row's width and `widths_present` the number of distinct widths.
    """
    planes = n * k * bits // 8
    affines = n * (k // group_size) * AFFINE_BYTES * widths_present
    lora_a = rank * k * ADAPTER_BYTES
    partials = split_k * m * (n + rank) * 4  # fp32 partial sums of y and of the shrink
    gemv = Traffic("decode_gemv+shrink", planes + affines + lora_a + m * k * act_bytes, partials)
    epilogue = Traffic("decode_epilogue+expand", partials + n * rank * ADAPTER_BYTES + (4 * n if bias else 0),
                       m * n * act_bytes)
    return [gemv, epilogue]


def prefill_traffic(
    m: int, n: int, k: int, bits: int, group_size: int, rank: int, act_bytes: int = 2,
    widths_present: int = 1, bias: bool = False,
) -> list[Traffic]:
    """Prefill path: the shrink launch (x·A[:r]ᵀ) and the tl.dot launch with expand and bias fused."""
    planes = n * k * bits // 8
    affines = n * (k // group_size) * AFFINE_BYTES * widths_present
    out: list[Traffic] = []
    if rank > 0:
        out.append(Traffic("shrink", m * k * act_bytes + rank * k * ADAPTER_BYTES, m * rank * 4))
    read = planes + affines + m * k * act_bytes + (m * rank * 4 + n * rank * ADAPTER_BYTES if rank else 0)
    out.append(Traffic("prefill_gemm+expand", read + (4 * n if bias else 0), m * n * act_bytes))
    return out


def elastic_traffic(m: int, n: int, k: int, bits: int, group_size: int, rank: int, decode_max_rows: int = 8,
                    **kw: int) -> list[Traffic]:
    """The launches the wrapper picks for M rows (decode up to `decode_max_rows`)."""
    if m <= decode_max_rows:
        return decode_traffic(m, n, k, bits, group_size, rank, **kw)
    kw.pop("split_k", None)
    return prefill_traffic(m, n, k, bits, group_size, rank, **kw)


def total_bytes(traffic: Sequence[Traffic]) -> int:
    return sum(t.total for t in traffic)


def decode_roofline(
    model: str, widths: Sequence[int], ranks: Sequence[int], group_size: int = 64,
    bandwidth: float = H100_HBM_BYTES_PER_S, m: int = 1,
) -> list[dict[str, float]]:
    """Per width: bytes per token over the block linears of all layers, roofline time, speed-up over fp16."""
    layers = MODEL_LAYERS[model]
    base = layers * sum(total_bytes(fp16_matmul_traffic(m, n, k)) for _, n, k in MODEL_SHAPES[model])
    rows = []
    for bits, rank in zip(widths, ranks):
        ours = layers * sum(total_bytes(decode_traffic(m, n, k, bits, group_size, rank)) for _, n, k in MODEL_SHAPES[model])
        rows.append({
            "bits": bits, "rank": rank, "bytes": ours, "fp16_bytes": base,
            "time_us": ours / bandwidth * 1e6, "fp16_time_us": base / bandwidth * 1e6,
            "speedup": base / ours, "ideal_speedup": ideal_speedup(bits, group_size),
        })
    return rows
