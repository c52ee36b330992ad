"""Triton kernels for the elastic linear: nested dequant-matmul over bit-planes plus cascaded adapters.

Math contract: `kernels.reference` (`elastic_linear_ref`, `pack_bitplanes_ref`, `lora_shrink_ref`,
`lora_expand_ref`). Weights are read as bit-planes, int32 [8, N, K/32] with plane 0 the MSB, so a
row at width `b` reads planes 0..b-1 only: b/8 byte per weight plus its width's group affines.

Kernels (launchers below each take their output buffers, so tests can poison them):

- `_pack_kernel`: uint8 codes [N, K] -> bit-planes (run once at load).
- `_decode_kernel` (few rows, GEMV with split-K): grid (N tiles + R tiles, SPLIT_K). Programs on
  an N tile rebuild the codes of the tile from planes 0..max_b-1 (max_b = the widest row of the
  batch), and each row takes its own top `b_m` bits (`q >> (max_b - b_m)`) and its own width's
  affines. Programs on an R tile compute the adapter shrink `x·Aᵀ` of the same K slice (the
  shrink is fused into the same launch). Both write fp32 partials per K split.
- `_decode_epilogue_kernel`: sums the K splits, masks the shrink to each row's rank, applies the
  expand `t·B[:, :r]ᵀ`, adds the bias and writes `out` in the activation dtype.
- `_shrink_kernel` (many rows): t = x·A[:R]ᵀ with `tl.dot`, zeroed beyond each row's rank.
- `_prefill_kernel` (many rows): tiles dequantized in registers and `tl.dot`, expand and bias
  fused. Rows of mixed widths are sorted by width on the device (a permutation, SGMV-style
  segments, no host sync); a row tile loads planes up to its widest row once and runs one
  `tl.dot` per width present in it (one for all but the tiles that straddle a segment boundary).

Without CUDA this module switches Triton to its interpreter (TRITON_INTERPRET=1) before the
kernels are defined, so the same code runs on CPU tensors (slowly; for tests).
"""

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    log.info("no CUDA device: running Triton kernels in the interpreter (TRITON_INTERPRET=1)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

PLANE_BITS = 32
N_PLANES = 8

# Block sizes used when not autotuning (interpreter): small, so that odd sizes exercise masks.
DEFAULT_DECODE_META: dict[str, int] = {"BLOCK_N": 32, "BLOCK_KW": 2}
DEFAULT_PREFILL_META: dict[str, int] = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KW": 2, "GROUP_M": 4}
DEFAULT_SHRINK_META: dict[str, int] = {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 64}
EPILOGUE_BLOCK_N = 64
EXPAND_BLOCK_R = 16


def _tuned(configs: list[Any], key: list[str]) -> Any:
    """`triton.autotune` on a GPU; the identity in the interpreter (explicit block sizes there)."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


# Autotuning spaces on a GPU: (num_warps, num_stages, block sizes). Tests run each one in the interpreter.
DECODE_CONFIGS: list[tuple[int, int, dict[str, int]]] = [
    (4, 2, {"BLOCK_N": 32, "BLOCK_KW": 4}), (4, 2, {"BLOCK_N": 64, "BLOCK_KW": 2}),
    (4, 2, {"BLOCK_N": 64, "BLOCK_KW": 4}), (8, 2, {"BLOCK_N": 64, "BLOCK_KW": 8}),
    (8, 2, {"BLOCK_N": 128, "BLOCK_KW": 2}), (8, 2, {"BLOCK_N": 128, "BLOCK_KW": 4}),
    (2, 2, {"BLOCK_N": 16, "BLOCK_KW": 8}), (4, 2, {"BLOCK_N": 16, "BLOCK_KW": 16}),
]
PREFILL_CONFIGS: list[tuple[int, int, dict[str, int]]] = [
    (4, 4, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_KW": 2, "GROUP_M": 8}),
    (4, 4, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_KW": 2, "GROUP_M": 8}),
    (4, 3, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_KW": 2, "GROUP_M": 8}),
    (8, 3, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_KW": 2, "GROUP_M": 8}),
    (8, 3, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_KW": 2, "GROUP_M": 8}),
    (8, 3, {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_KW": 4, "GROUP_M": 8}),
    (8, 3, {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_KW": 1, "GROUP_M": 8}),
]
SHRINK_CONFIGS: list[tuple[int, int, dict[str, int]]] = [
    (4, 3, {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 128}), (4, 3, {"BLOCK_M": 32, "BLOCK_R": 32, "BLOCK_K": 64}),
    (4, 3, {"BLOCK_M": 64, "BLOCK_R": 16, "BLOCK_K": 64}), (8, 3, {"BLOCK_M": 128, "BLOCK_R": 32, "BLOCK_K": 64}),
    (8, 3, {"BLOCK_M": 128, "BLOCK_R": 64, "BLOCK_K": 32}),
]


def _configs(space: list[tuple[int, int, dict[str, int]]]) -> list[Any]:
    if INTERPRET:
        return []
    return [triton.Config(dict(meta), num_warps=w, num_stages=st) for w, st, meta in space]


_DECODE_CONFIGS = _configs(DECODE_CONFIGS)
_PREFILL_CONFIGS = _configs(PREFILL_CONFIGS)
_SHRINK_CONFIGS = _configs(SHRINK_CONFIGS)


@triton.jit
def _pack_kernel(codes_ptr, planes_ptr, N, KW, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kw = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_j = tl.arange(0, 32)
    mask2 = (offs_n < N)[:, None] & (offs_kw < KW)[None, :]  # [BN, BKW]
    col = offs_n[:, None, None] * (KW * 32) + offs_kw[None, :, None] * 32 + offs_j[None, None, :]
    codes = tl.load(codes_ptr + col, mask=mask2[:, :, None], other=0).to(tl.int32)  # [BN, BKW, 32]
    for p in tl.static_range(8):
        bits = ((codes >> (7 - p)) & 1) << offs_j[None, None, :]
        word = tl.sum(bits, axis=2)  # [BN, BKW]; distinct bits, so the sum is an OR (mod 2^32)
        tl.store(planes_ptr + p * N * KW + offs_n[:, None] * KW + offs_kw[None, :], word, mask=mask2)


@_tuned(_DECODE_CONFIGS, key=["M", "N", "KW", "R", "SPLIT_K"])
@triton.jit
def _decode_kernel(
    x_ptr, planes_ptr, scales_ptr, mins_ptr, lora_a_ptr, y_ws_ptr, t_ws_ptr,
    row_widx_ptr, wbits_ptr, wranks_ptr,
    M, N, KW, KG, R, SPLIT_K, stride_xm,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_j = tl.arange(0, 32)
    words = tl.cdiv(KW, SPLIT_K)
    kw_lo = pid_k * words
    kw_hi = tl.minimum(kw_lo + words, KW)
    widx = tl.load(row_widx_ptr + offs_m, mask=m_mask, other=0)  # [BM]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if pid_n < n_tiles:
        # quantized GEMV partial over words [kw_lo, kw_hi) of every row
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rbits = tl.load(wbits_ptr + widx, mask=m_mask, other=0)  # [BM]
        max_b = tl.max(rbits, axis=0)
        for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
            offs_kw = kw0 + tl.arange(0, BLOCK_KW)
            kw_mask = offs_kw < kw_hi
            w_mask = n_mask[:, None] & kw_mask[None, :]  # [BN, BKW]
            q = tl.zeros([BLOCK_N, BLOCK_KW, 32], dtype=tl.int32)  # max_b-bit codes
            for p in range(0, max_b):
                word = tl.load(planes_ptr + p * N * KW + offs_n[:, None] * KW + offs_kw[None, :],
                               mask=w_mask, other=0)  # [BN, BKW]
                q = (q << 1) | ((word[:, :, None] >> offs_j[None, None, :]) & 1)
            g_off = offs_n[:, None] * KG + (offs_kw[None, :] * 32) // GROUP  # [BN, BKW], group of each word
            for mi in tl.static_range(BLOCK_M):
                sel = offs_m == mi
                w_m = tl.sum(tl.where(sel, widx, 0), axis=0)
                shift = max_b - tl.sum(tl.where(sel, rbits, 0), axis=0)
                x_row = tl.sum(tl.where(sel & m_mask, offs_m, 0), axis=0)  # padded rows read row 0
                xv = tl.load(x_ptr + x_row * stride_xm + offs_kw[:, None] * 32 + offs_j[None, :],
                             mask=kw_mask[:, None], other=0.0).to(tl.float32)  # [BKW, 32]
                qx = tl.sum((q >> shift).to(tl.float32) * xv[None, :, :], axis=2)  # [BN, BKW]
                s = tl.load(scales_ptr + w_m * N * KG + g_off, mask=w_mask, other=0.0).to(tl.float32)
                mn = tl.load(mins_ptr + w_m * N * KG + g_off, mask=w_mask, other=0.0).to(tl.float32)
                part = tl.sum(s * qx + mn * tl.sum(xv, axis=1)[None, :], axis=1)  # [BN]
                acc = tl.where(sel[:, None], acc + part[None, :], acc)
        tl.store(y_ws_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc,
                 mask=m_mask[:, None] & n_mask[None, :])
    else:
        # adapter shrink partial: t[m, r] = x[m, slice] · A[r, slice]
        offs_r = (pid_n - n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_mask = offs_r < R
        row_rank = tl.load(wranks_ptr + widx, mask=m_mask, other=0)
        max_rank = tl.max(row_rank, axis=0)
        if (pid_n - n_tiles) * BLOCK_N < max_rank:  # tiles beyond every row's rank are never read
            for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
                offs_kw = kw0 + tl.arange(0, BLOCK_KW)
                kw_mask = offs_kw < kw_hi
                a_off = offs_r[:, None, None] * (KW * 32) + offs_kw[None, :, None] * 32 + offs_j[None, None, :]
                a = tl.load(lora_a_ptr + a_off, mask=r_mask[:, None, None] & kw_mask[None, :, None],
                            other=0.0).to(tl.float32)  # [BR, BKW, 32]
                for mi in tl.static_range(BLOCK_M):
                    x_row = tl.sum(tl.where((offs_m == mi) & m_mask, offs_m, 0), axis=0)
                    xv = tl.load(x_ptr + x_row * stride_xm + offs_kw[:, None] * 32 + offs_j[None, :],
                                 mask=kw_mask[:, None], other=0.0).to(tl.float32)  # [BKW, 32]
                    part = tl.sum(tl.sum(a * xv[None, :, :], axis=2), axis=1)  # [BR]
                    acc = tl.where((offs_m == mi)[:, None], acc + part[None, :], acc)
            tl.store(t_ws_ptr + pid_k * M * R + offs_m[:, None] * R + offs_r[None, :], acc,
                     mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _decode_epilogue_kernel(
    y_ws_ptr, t_ws_ptr, lora_b_ptr, bias_ptr, out_ptr, row_widx_ptr, wranks_ptr,
    M, N, R, SPLIT_K, stride_bn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mn_mask = m_mask[:, None] & n_mask[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(y_ws_ptr + s * M * N + offs_m[:, None] * N + offs_n[None, :], mask=mn_mask, other=0.0)
    widx = tl.load(row_widx_ptr + offs_m, mask=m_mask, other=0)
    rank = tl.load(wranks_ptr + widx, mask=m_mask, other=0)  # [BM]
    max_rank = tl.max(rank, axis=0)
    for r0 in range(0, max_rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        t_mask = m_mask[:, None] & (offs_r[None, :] < rank[:, None])  # [BM, BR], per-row rank
        t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for s in range(0, SPLIT_K):
            t += tl.load(t_ws_ptr + s * M * R + offs_m[:, None] * R + offs_r[None, :], mask=t_mask, other=0.0)
        b = tl.load(lora_b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                    mask=n_mask[:, None] & (offs_r < R)[None, :], other=0.0).to(tl.float32)  # [BN, BR]
        acc += tl.sum(t[:, None, :] * b[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mn_mask)


@_tuned(_SHRINK_CONFIGS, key=["M_BUCKET", "K", "R"])
@triton.jit
def _shrink_kernel(
    x_ptr, lora_a_ptr, t_ptr, row_widx_ptr, wranks_ptr, M, K, R, M_BUCKET, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    widx = tl.load(row_widx_ptr + offs_m, mask=m_mask, other=0)
    rank = tl.load(wranks_ptr + widx, mask=m_mask, other=0)  # [BM]
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if pid_r * BLOCK_R < tl.max(rank, axis=0):
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
            at = tl.load(lora_a_ptr + offs_r[:, None] * K + offs_k[None, :],
                         mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BR, BK]
            if DOT_F32:
                acc = tl.dot(xt.to(tl.float32), tl.trans(at.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(at.to(xt.dtype)), acc)
    acc = tl.where(offs_r[None, :] < rank[:, None], acc, 0.0)
    tl.store(t_ptr + offs_m[:, None] * R + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])


@_tuned(_PREFILL_CONFIGS, key=["M_BUCKET", "N", "KW", "R"])
@triton.jit
def _prefill_kernel(
    x_ptr, planes_ptr, scales_ptr, mins_ptr, t_ptr, lora_b_ptr, bias_ptr, out_ptr,
    row_widx_ptr, perm_ptr, wbits_ptr, wranks_ptr,
    M, N, KW, KG, R, M_BUCKET, stride_xm, stride_bn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
):
    # grouped launch order: GROUP_M row tiles share the weight tiles they read (L2 reuse)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in width-sorted order
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if HAS_PERM:
        rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0)  # original row of each position
    else:
        rows = offs_m
    widx = tl.load(row_widx_ptr + offs_m, mask=m_mask, other=0)  # sorted when HAS_PERM
    rbits = tl.load(wbits_ptr + widx, mask=m_mask, other=0)
    max_b = tl.max(rbits, axis=0)
    w_lo = tl.min(tl.where(m_mask, widx, 1 << 20), axis=0)
    w_hi = tl.max(tl.where(m_mask, widx, -1), axis=0)
    offs_j = tl.arange(0, 32)
    BLOCK_K: tl.constexpr = BLOCK_KW * 32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kw0 in range(0, KW, BLOCK_KW):
        offs_kw = kw0 + tl.arange(0, BLOCK_KW)
        offs_k = kw0 * 32 + tl.arange(0, BLOCK_K)
        w_mask = n_mask[:, None] & (offs_kw < KW)[None, :]  # [BN, BKW]
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                     mask=m_mask[:, None] & (offs_k < KW * 32)[None, :], other=0.0)  # [BM, BK]
        if DOT_F32:
            xt = xt.to(tl.float32)
        q = tl.zeros([BLOCK_N, BLOCK_KW, 32], dtype=tl.int32)  # max_b-bit codes of the tile
        for p in range(0, max_b):
            word = tl.load(planes_ptr + p * N * KW + offs_n[:, None] * KW + offs_kw[None, :],
                           mask=w_mask, other=0)  # [BN, BKW]
            q = (q << 1) | ((word[:, :, None] >> offs_j[None, None, :]) & 1)
        g_off = offs_n[:, None] * KG + (offs_kw[None, :] * 32) // GROUP  # [BN, BKW]
        for w in range(w_lo, w_hi + 1):  # widths present in this row tile (usually one)
            sel = (widx == w) & m_mask
            if tl.sum(sel.to(tl.int32), axis=0) > 0:
                shift = max_b - tl.load(wbits_ptr + w)
                s = tl.load(scales_ptr + w * N * KG + g_off, mask=w_mask, other=0.0).to(tl.float32)
                mn = tl.load(mins_ptr + w * N * KG + g_off, mask=w_mask, other=0.0).to(tl.float32)
                deq = (q >> shift).to(tl.float32) * s[:, :, None] + mn[:, :, None]  # [BN, BKW, 32]
                deq = tl.reshape(deq, [BLOCK_N, BLOCK_K]).to(xt.dtype)  # [BN, BK], rounded to the dot dtype
                xs = tl.where(sel[:, None], xt, 0.0)
                if DOT_F32:
                    acc = tl.dot(xs, tl.trans(deq), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xs, tl.trans(deq), acc)
    # adapter expand: acc += t[rows, :r] · B[n, :r]ᵀ (t is zero beyond each row's rank)
    rank = tl.load(wranks_ptr + widx, mask=m_mask, other=0)
    for r0 in range(0, tl.max(rank, axis=0), BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        t = tl.load(t_ptr + rows[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                    other=0.0).to(xt.dtype)  # [BM, BR]
        b = tl.load(lora_b_ptr + offs_r[:, None] + offs_n[None, :] * stride_bn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(xt.dtype)  # [BR, BN]
        if DOT_F32:
            acc = tl.dot(t, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(t, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# ------------------------------------------------------------------------------------ launchers


def _kernel_and_meta(kernel: Any, meta: dict[str, int] | None, default: dict[str, int]) -> tuple[Any, dict[str, int]]:
    """Explicit block sizes (interpreter, tests) bypass the autotuner; otherwise it picks them."""
    if isinstance(kernel, triton.runtime.Autotuner):
        return (kernel.fn, dict(meta)) if meta else (kernel, {})
    return kernel, dict(meta or default)


def _dot_f32(dtype: torch.dtype) -> bool:
    """fp32 activations take exact fp32 dots. fp16/bf16 take tensor-core dots on the GPU; the
    interpreter gets bf16 arithmetic wrong (numpy has no bf16), so there bf16 dots run in fp32."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _pow2_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def _check_act(x: torch.Tensor, k: int) -> None:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x dtype {x.dtype} not supported; use float16, bfloat16 or float32")
    if x.stride(1) != 1:
        raise ValueError("x must have unit stride along K")


def _check_weights(planes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
    """The kernels index these as dense row-major arrays."""
    for name, t in (("planes", planes), ("scales", scales), ("mins", mins)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (prepare them once at load)")
    if planes.dtype != torch.int32 or planes.dim() != 3 or planes.shape[0] != N_PLANES:
        raise ValueError(f"planes must be int32 [8, N, K/32], got {planes.dtype} {list(planes.shape)}")
    if scales.shape != mins.shape or scales.shape[1] != planes.shape[1]:
        raise ValueError(f"scales {list(scales.shape)} and mins {list(mins.shape)} must be [W, N={planes.shape[1]}, K/G]")


def pack_bitplanes(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 bit-planes [8, N, K/32] (plane 0 = MSB); reference: pack_bitplanes_ref."""
    n, k = codes.shape
    if codes.dtype != torch.uint8 or k % PLANE_BITS:
        raise ValueError(f"codes must be uint8 [N, K] with K a multiple of 32, got {codes.dtype} {list(codes.shape)}")
    kw = k // PLANE_BITS
    codes = codes.contiguous()
    if out is None:
        out = torch.empty(N_PLANES, n, kw, dtype=torch.int32, device=codes.device)
    block_n, block_kw = 32, 4
    _pack_kernel[(triton.cdiv(n, block_n), triton.cdiv(kw, block_kw))](
        codes, out, n, kw, BLOCK_N=block_n, BLOCK_KW=block_kw)
    return out


def decode_partials(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, lora_a: torch.Tensor,
    row_widx: torch.Tensor, wbits: torch.Tensor, wranks: torch.Tensor, group_size: int, split_k: int,
    y_ws: torch.Tensor, t_ws: torch.Tensor, meta: dict[str, int] | None = None,
) -> None:
    """Decode kernel: y_ws[s] (fp32 [SPLIT_K, M, N]) and t_ws[s] (fp32 [SPLIT_K, M, R]) partial sums.

    Summed over s, y_ws is x·deq_b(W)ᵀ per row and t_ws is x·A[:R]ᵀ (for columns below the
    largest rank in the batch; the rest is never written and never read).
    """
    _, n, kw = planes.shape
    m = x.shape[0]
    r = lora_a.shape[0]
    _check_act(x, kw * PLANE_BITS)
    if m > 16:
        raise ValueError(f"the decode kernel takes at most 16 rows, got {m}")
    _check_weights(planes, scales, mins)
    kernel, kmeta = _kernel_and_meta(_decode_kernel, meta, DEFAULT_DECODE_META)
    lora = lora_a.contiguous() if r > 0 else planes  # never read when R == 0

    def grid(mt: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(n, mt["BLOCK_N"]) + triton.cdiv(r, mt["BLOCK_N"]), split_k)

    kernel[grid](
        x, planes, scales, mins, lora, y_ws, t_ws if r > 0 else y_ws, row_widx, wbits, wranks,
        m, n, kw, scales.shape[-1], r, split_k, x.stride(0),
        GROUP=group_size, BLOCK_M=max(1, _pow2_bucket(m)), **kmeta)


def decode_epilogue(
    y_ws: torch.Tensor, t_ws: torch.Tensor, lora_b: torch.Tensor, bias: torch.Tensor | None,
    row_widx: torch.Tensor, wranks: torch.Tensor, out: torch.Tensor,
) -> None:
    """out[m] = sum_s y_ws[s, m] + (sum_s t_ws[s, m, :r_m]) · B[:, :r_m]ᵀ + bias, in out.dtype."""
    split_k, m, n = y_ws.shape
    r = t_ws.shape[-1]
    _decode_epilogue_kernel[(triton.cdiv(n, EPILOGUE_BLOCK_N),)](
        y_ws, t_ws if r > 0 else y_ws, lora_b if r > 0 else y_ws, bias if bias is not None else y_ws, out,
        row_widx, wranks, m, n, r, split_k, lora_b.stride(0) if r > 0 else 0, out.stride(0),
        BLOCK_M=max(1, _pow2_bucket(m)), BLOCK_N=EPILOGUE_BLOCK_N, BLOCK_R=EXPAND_BLOCK_R,
        HAS_BIAS=bias is not None)


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, row_widx: torch.Tensor, wranks: torch.Tensor, out: torch.Tensor,
    meta: dict[str, int] | None = None,
) -> None:
    """out fp32 [M, R] = x·A[:R]ᵀ, zero beyond each row's rank (reference: lora_shrink_ref)."""
    m, k = x.shape
    r = lora_a.shape[0]
    _check_act(x, lora_a.shape[1])
    kernel, kmeta = _kernel_and_meta(_shrink_kernel, meta, DEFAULT_SHRINK_META)

    def grid(mt: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(m, mt["BLOCK_M"]), triton.cdiv(r, mt["BLOCK_R"]))

    kernel[grid](x, lora_a.contiguous(), out, row_widx, wranks, m, k, r, _pow2_bucket(m), x.stride(0),
                 DOT_F32=_dot_f32(x.dtype), **kmeta)


def prefill(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, t: torch.Tensor | None,
    lora_b: torch.Tensor, bias: torch.Tensor | None, row_widx: torch.Tensor, perm: torch.Tensor | None,
    wbits: torch.Tensor, wranks: torch.Tensor, group_size: int, out: torch.Tensor,
    meta: dict[str, int] | None = None,
) -> None:
    """Prefill kernel: out = elastic linear of every row, with `t` (fp32 [M, R], from lora_shrink).

    With `perm`, row_widx is in width-sorted order and perm[i] is the original row at position i.
    """
    _, n, kw = planes.shape
    m = x.shape[0]
    r = 0 if t is None else t.shape[1]
    _check_act(x, kw * PLANE_BITS)
    _check_weights(planes, scales, mins)
    kernel, kmeta = _kernel_and_meta(_prefill_kernel, meta, DEFAULT_PREFILL_META)

    def grid(mt: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(n, mt["BLOCK_N"]),)

    dummy = row_widx
    kernel[grid](
        x, planes, scales, mins, t if r > 0 else x, lora_b if r > 0 else x, bias if bias is not None else x, out,
        row_widx, perm if perm is not None else dummy, wbits, wranks,
        m, n, kw, scales.shape[-1], r, _pow2_bucket(m), x.stride(0), lora_b.stride(0) if r > 0 else 0,
        out.stride(0), GROUP=group_size, BLOCK_R=EXPAND_BLOCK_R, HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None, DOT_F32=_dot_f32(x.dtype), **kmeta)
