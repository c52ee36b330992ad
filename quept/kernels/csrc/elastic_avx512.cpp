// AVX-512 (F, BW, VL, VNNI) path of the native elastic linear: one zmm holds a whole tile of 16
// rows x 4 columns, codes are rebuilt from the bit-planes with one shift + one ternlog per plane,
// and vpdpbusd does the u8 x s8 dot products without the int16 saturation of maddubs.
// Compiled without -mavx512*: see the note on target pragmas in elastic_avx2.cpp.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "elastic_common.h"

#if defined(QUEPT_X86)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")

#include "elastic_tiles.h"  // after the pragma: the shared tile loop, compiled for AVX-512

namespace quept {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// acc += q (u8) . broadcast(*x4) (s8) with the broadcast embedded in the instruction ({1to16}): GCC
// emits a separate vpbroadcastd for _mm512_set1_epi32(load), one more vector uop per dot product.
inline __m512i dpbusd_bcast(__m512i acc, __m512i q, const int8_t* x4) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(q), "m"(*reinterpret_cast<const int32_t*>(x4)));
    return acc;
}

inline __m512 load_half16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// The 8 code vectors of chunk c of tile t at width B: vector i, byte r*4+j = code of (row r, column 4i+j).
template <int B>
inline void unpack_chunk(const uint8_t* base, int64_t plane_stride, int64_t c, __m512i q[8]) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) q[i] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int p = 0; p < B; ++p) {
        const int pos = B - 1 - p;
        const __m512i plane = _mm512_loadu_si512((const void*)(base + p * plane_stride + c * kBlockBytes));
        const __m512i mask = _mm512_set1_epi8((char)(1 << pos));
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
            const int s = i - pos;
            const __m512i v = s > 0 ? _mm512_srli_epi16(plane, s) : (s < 0 ? _mm512_slli_epi16(plane, -s) : plane);
            q[i] = _mm512_ternarylogic_epi32(q[i], v, mask, 0xF8);  // q | (v & mask)
        }
    }
}

// Codes enter the dot products centred, q - 2^(b-1), and the min term takes mins + 2^(b-1) scales:
// the same value, but the activation rounding error is then sum (q - 2^(b-1)) (x - xq dx), about a
// third of sum q (x - xq dx) for bell-shaped weights. sum (q - c) xq = sum q xq - c sum xq (exact).
template <int B>
constexpr int32_t kCentre = 1 << (B - 1);

// Rows rows[0..MB) of one segment against tile t. FUSED: rebuild the codes per chunk in registers
// (few rows); otherwise read them from qbuf[c][i][64], filled once per tile. REF: refined rows, the
// codes of each chunk also meet the residual activations (second integer accumulator).
template <int B, int MB, bool FUSED, bool REF>
void dot_tile(const LayerView& L, const ActView& A, const Segment& seg, const int32_t* rows, int64_t t,
              const uint8_t* qbuf) {
    const int64_t K = L.k;
    const int64_t cpg = L.group_size / kChunk;
    const uint8_t* base = L.planes + t * L.n_chunks * kBlockBytes;
    const uint16_t* sc_p = L.scales + seg.widx * L.width_stride + t * L.n_groups * kTileRows;
    const uint16_t* mn_p = L.mins + seg.widx * L.width_stride + t * L.n_groups * kTileRows;
    const int8_t* xr[MB];
    const float* dxr[MB];
    const float* xsr[MB];
    const int32_t* xqs[MB];
    const int8_t* xr2[MB];
    const float* dxr2[MB];
    const int32_t* xqs2[MB];
    __m512 facc[MB];
#pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) {
        if (REF) {
            xr2[mb] = A.xq2 + rows[mb] * K;
            dxr2[mb] = A.dx2 + rows[mb] * L.n_chunks;
            xqs2[mb] = A.xqsum2 + rows[mb] * L.n_chunks;
        }
        xr[mb] = A.xq + rows[mb] * K;
        dxr[mb] = A.dx + rows[mb] * L.n_chunks;
        xsr[mb] = A.xsum + rows[mb] * L.n_groups;
        xqs[mb] = A.xqsum + rows[mb] * L.n_chunks;
        facc[mb] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < L.n_groups; ++g) {
        const __m512 sc = load_half16(sc_p + g * kTileRows);
        const __m512 mn = _mm512_fmadd_ps(_mm512_set1_ps((float)kCentre<B>), sc, load_half16(mn_p + g * kTileRows));
        for (int64_t cc = 0; cc < cpg; ++cc) {
            const int64_t c = g * cpg + cc;
            __m512i q[8];
            if (FUSED) {
                unpack_chunk<B>(base, L.plane_stride, c, q);
            } else {
#pragma GCC unroll 8
                for (int i = 0; i < 8; ++i) q[i] = _mm512_load_si512((const void*)(qbuf + (c * 8 + i) * 64));
            }
            __m512i iacc[MB], iacc2[MB];
#pragma GCC unroll 8
            for (int mb = 0; mb < MB; ++mb) {
                iacc[mb] = _mm512_set1_epi32(-kCentre<B> * xqs[mb][c]);
                if (REF) iacc2[mb] = _mm512_set1_epi32(-kCentre<B> * xqs2[mb][c]);
            }
#pragma GCC unroll 8
            for (int i = 0; i < 8; ++i) {
#pragma GCC unroll 8
                for (int mb = 0; mb < MB; ++mb) {
                    iacc[mb] = dpbusd_bcast(iacc[mb], q[i], xr[mb] + c * kChunk + 4 * i);
                    if (REF) iacc2[mb] = dpbusd_bcast(iacc2[mb], q[i], xr2[mb] + c * kChunk + 4 * i);
                }
            }
#pragma GCC unroll 8
            for (int mb = 0; mb < MB; ++mb) {
                const __m512 s = _mm512_mul_ps(sc, _mm512_set1_ps(dxr[mb][c]));
                facc[mb] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[mb]), s, facc[mb]);
                if (REF) {
                    const __m512 s2 = _mm512_mul_ps(sc, _mm512_set1_ps(dxr2[mb][c]));
                    facc[mb] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc2[mb]), s2, facc[mb]);
                }
            }
        }
#pragma GCC unroll 8
        for (int mb = 0; mb < MB; ++mb) facc[mb] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsr[mb][g]), facc[mb]);
    }
    const uint16_t* lb = L.lora_b + t * L.rank_max * kTileRows;
    for (int j = 0; j < seg.rank; ++j) {
        const __m512 bv = load_half16(lb + j * kTileRows);
#pragma GCC unroll 8
        for (int mb = 0; mb < MB; ++mb) {
            facc[mb] = _mm512_fmadd_ps(bv, _mm512_set1_ps(A.u[rows[mb] * L.rank_max + j]), facc[mb]);
        }
    }
    const int64_t n0 = t * kTileRows;
    const int64_t valid = imin(kTileRows, L.n - n0);
    const __mmask16 keep = (__mmask16)((1u << valid) - 1u);
    if (L.bias) {
        const __m512 bias = _mm512_loadu_ps(L.bias + n0);
#pragma GCC unroll 8
        for (int mb = 0; mb < MB; ++mb) facc[mb] = _mm512_add_ps(facc[mb], bias);
    }
#pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) _mm512_mask_storeu_ps(A.out + rows[mb] * L.n + n0, keep, facc[mb]);
}

template <int B, bool FUSED, bool REF>
void dot_rows_ref(const LayerView& L, const ActView& A, const Segment& seg, int64_t t, const uint8_t* qbuf) {
    int64_t mi = 0;
    if constexpr (!FUSED) {  // 8 rows: 8 + 8 accumulators and 8 code vectors fit the 32 registers
        for (; mi + 8 <= seg.n_rows; mi += 8) dot_tile<B, 8, FUSED, REF>(L, A, seg, seg.rows + mi, t, qbuf);
    }
    for (; mi + 4 <= seg.n_rows; mi += 4) dot_tile<B, 4, FUSED, REF>(L, A, seg, seg.rows + mi, t, qbuf);
    switch (seg.n_rows - mi) {
        case 3: dot_tile<B, 3, FUSED, REF>(L, A, seg, seg.rows + mi, t, qbuf); break;
        case 2: dot_tile<B, 2, FUSED, REF>(L, A, seg, seg.rows + mi, t, qbuf); break;
        case 1: dot_tile<B, 1, FUSED, REF>(L, A, seg, seg.rows + mi, t, qbuf); break;
        default: break;
    }
}

// Refined segments exist at width 8 only (the binding's rule): other widths never build REF code.
template <int B, bool FUSED>
void dot_rows(const LayerView& L, const ActView& A, const Segment& seg, int64_t t, const uint8_t* qbuf) {
    if constexpr (B == 8) {
        if (seg.refine) {
            dot_rows_ref<B, FUSED, true>(L, A, seg, t, qbuf);
            return;
        }
    }
    dot_rows_ref<B, FUSED, false>(L, A, seg, t, qbuf);
}

// The kernel run_tiles (elastic_tiles.h) drives: one segment's rows against tile t.
struct Avx512Kernel {
    template <int B>
    static void segment(const LayerView& L, const ActView& A, const Segment& seg, int64_t t, uint8_t* qbuf) {
        if (seg.n_rows <= 4) {  // decode: rebuild the codes in registers, once per chunk
            dot_rows<B, true>(L, A, seg, t, qbuf);
            return;
        }
        const uint8_t* base = L.planes + t * L.n_chunks * kBlockBytes;
        for (int64_t c = 0; c < L.n_chunks; ++c) {
            __m512i q[8];
            unpack_chunk<B>(base, L.plane_stride, c, q);
#pragma GCC unroll 8
            for (int i = 0; i < 8; ++i) _mm512_store_si512((void*)(qbuf + (c * 8 + i) * 64), q[i]);
        }
        dot_rows<B, false>(L, A, seg, t, qbuf);
    }
};

}  // namespace

void tiles_avx512(const LayerView& L, const ActView& A, const Segment* segs, int n_segs, int64_t t0, int64_t t1,
                  uint8_t* scratch) {
    run_tiles<Avx512Kernel>(L, A, segs, n_segs, t0, t1, scratch);
}

}  // namespace quept

#pragma GCC pop_options
#endif  // QUEPT_X86
