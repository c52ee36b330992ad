// Shared definitions of the native elastic-linear kernel (no torch headers: the ISA files that
// include this are compiled with per-function target options and must not instantiate library
// templates; see elastic_avx2.cpp).
//
// Packed layout (built once at load by pack_planes in elastic_pack.cpp):
//   tile     16 consecutive output rows n (N is padded up to a multiple of 16 with zeros)
//   chunk    32 consecutive input columns k (K must be a multiple of 32)
//   planes   uint8 [8][n_tiles][n_chunks][64]; plane p holds bit (7 - p) of every master code,
//            so width b reads planes 0..b-1 only: bytes read are b/8 of the codes.
//            Inside one (plane, tile, chunk) block of 64 bytes, byte (r * 4 + j) bit i holds the
//            weight (row r of the tile, column 4 * i + j of the chunk); taking bit i of every byte
//            gives 16 rows x 4 consecutive columns, which one 4-byte broadcast of the activations
//            meets in a u8 x s8 dot product (maddubs / vpdpbusd).
//   scales   fp16 [W][n_tiles][n_groups][16], mins likewise (per width, per group, per row)
//   lora_b   fp16 [n_tiles][R][16]; lora_a fp16 [R][K]; bias fp32 [n_tiles * 16] or null
//
// Activations are quantized per row and per chunk of 32 to int8 with a scale (as llama.cpp's Q8_0):
//   dx = max|x| / 127, xq = round_half_even(x * (1 / dx)); the per-group sums of the fp32 x (for
//   the min term) and the adapter down-projection u = x A[:r]^T are computed from the fp32 x.
// Refined rows (width 8 unless switched off, see set_w8_refine) carry their activations as two int8
// terms: the residual r = x - xq dx is quantized the same way (dx2 = max|r| / 127, xq2), and the
// code term takes sum (q - c) (xq dx + xq2 dx2): about 15 bits of activation for the width whose
// weights are finest, where one int8 term would dominate the error. The codes are unpacked once
// and meet both terms, so it costs a second dot product per chunk, not a second pass.
#pragma once

#include <cstdint>

namespace quept {

constexpr int kTileRows = 16;
constexpr int kChunk = 32;
constexpr int kBlockBytes = kTileRows * kChunk / 8;  // bytes of one (plane, tile, chunk) block

struct LayerView {
    const uint8_t* planes;    // [8][n_tiles][n_chunks][64]
    const uint16_t* scales;   // fp16 [W][n_tiles][n_groups][16]
    const uint16_t* mins;     // fp16 [W][n_tiles][n_groups][16]
    const uint16_t* lora_a;   // fp16 [R][K]
    const uint16_t* lora_b;   // fp16 [n_tiles][R][16]
    const float* bias;        // [n_tiles * 16] or nullptr
    int64_t n, k, n_tiles, n_chunks, n_groups, group_size, rank_max;
    int64_t plane_stride;     // n_tiles * n_chunks * 64
    int64_t width_stride;     // n_tiles * n_groups * 16
};

// Quantized activations of one call, indexed by the original row.
struct ActView {
    const int8_t* xq;   // [M][K]
    const float* dx;    // [M][n_chunks]
    const int32_t* xqsum;  // [M][n_chunks] sums of xq per chunk (for codes centred at 128)
    const float* xsum;  // [M][n_groups] sums of the fp32 x per weight group
    const float* u;     // [M][R] adapter down-projection (first r_b entries valid)
    float* out;         // [M][N]
    const int8_t* xq2 = nullptr;     // [M][K] residual term of refined rows (else unused)
    const float* dx2 = nullptr;      // [M][n_chunks]
    const int32_t* xqsum2 = nullptr; // [M][n_chunks]
};

// Rows of one call that share a width.
struct Segment {
    int bits;            // 1..8
    int widx;            // position of bits in the stored widths
    int rank;            // adapter rank of this width
    const int32_t* rows; // row indices
    int64_t n_rows;
    bool refine = false; // two-term activations (ActView xq2/dx2/xqsum2); only with bits == 8
};

// Tiles [t0, t1) of one layer for every segment. scratch: at least scratch_bytes(k) bytes, 64-aligned.
using TilesFn = void (*)(const LayerView&, const ActView&, const Segment*, int, int64_t, int64_t, uint8_t*);
// Quantize rows [m0, m1): fills xq, dx, xqsum, xsum and u (u for the first rank[m] entries).
using RowsFn = void (*)(const float* x, int64_t m0, int64_t m1, const LayerView&, const int32_t* row_rank,
                        int8_t* xq, float* dx, int32_t* xqsum, float* xsum, float* u);

inline int64_t scratch_bytes(int64_t k) { return 2 * 8 * k * 2 + 256; }

// Residual term of rows [m0, m1) (after the rows function): r = x - xq dx, quantized as x is.
using ResidualFn = void (*)(const float*, int64_t, int64_t, const LayerView&, const int8_t*, const float*, int8_t*,
                           float*, int32_t*);
void residual_generic(const float* x, int64_t m0, int64_t m1, const LayerView& L, const int8_t* xq, const float* dx,
                      int8_t* xq2, float* dx2, int32_t* xqsum2);

void tiles_generic(const LayerView&, const ActView&, const Segment*, int, int64_t, int64_t, uint8_t*);
void rows_generic(const float*, int64_t, int64_t, const LayerView&, const int32_t*, int8_t*, float*, int32_t*, float*,
                  float*);
#if defined(__x86_64__) && defined(__GNUC__)
#define QUEPT_X86 1
void tiles_avx2(const LayerView&, const ActView&, const Segment*, int, int64_t, int64_t, uint8_t*);
void rows_avx2(const float*, int64_t, int64_t, const LayerView&, const int32_t*, int8_t*, float*, int32_t*, float*, float*);
void residual_avx2(const float*, int64_t, int64_t, const LayerView&, const int8_t*, const float*, int8_t*, float*,
                   int32_t*);
void tiles_avx512(const LayerView&, const ActView&, const Segment*, int, int64_t, int64_t, uint8_t*);
#endif

// IEEE half -> float without library or ISA support (for the generic path).
inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while ((man & 0x400u) == 0) {
                man <<= 1;
                --exp;
            }
            man &= 0x3ffu;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

}  // namespace quept
