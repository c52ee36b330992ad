// AVX2 + FMA + F16C path of the native elastic linear.
//
// This file is compiled without -mavx2: the code below the `#pragma GCC target` line is the only
// code built for AVX2, and it is only called after a run-time CPU check (the ISA table, isa.cpp).
// Every library header is included before the pragma and nothing below it instantiates a library
// template, so no AVX2 copy of a shared inline function can leak into the rest of the program (our
// avx2_lanes.h and elastic_tiles.h, included after it on purpose, keep their functions in an anonymous
// namespace).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "elastic_common.h"

#if defined(QUEPT_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "avx2_lanes.h"  // after the pragma: its functions are compiled for AVX2 (see the header)
#include "elastic_tiles.h"  // likewise: the shared tile loop

namespace quept {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Exchange the bits of a at positions k + D with the bits of b at positions k, for the bits k set in
// every byte of m (a delta swap; 16-bit shifts, m drops what crosses a byte). AN / BN: a / b may be
// nonzero; a vector known to be zero (a plane above width B) saves half the work.
template <int D, bool AN, bool BN>
inline void swap_bits(__m256i& a, __m256i& b, __m256i m) {
    if constexpr (AN && BN) {
        const __m256i t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi16(a, D), b), m);
        b = _mm256_xor_si256(b, t);
        a = _mm256_xor_si256(a, _mm256_slli_epi16(t, D));
    } else if constexpr (AN) {
        b = _mm256_and_si256(_mm256_srli_epi16(a, D), m);
        a = _mm256_andnot_si256(_mm256_slli_epi16(m, D), a);
    } else if constexpr (BN) {
        a = _mm256_slli_epi16(_mm256_and_si256(b, m), D);
        b = _mm256_andnot_si256(m, b);
    }
}

// Which of the 8 vectors may be nonzero after the transpose stages of distance >= D (8: before any),
// when only r[0..B) start nonzero: a swap makes both of its vectors nonzero if either was.
constexpr bool maybe_nonzero(int B, int D, int j) {
    if (D == 8) return j < B;
    const int partner = j ^ D;
    return maybe_nonzero(B, 2 * D, j) || maybe_nonzero(B, 2 * D, partner);
}

// One transpose stage: the 4 swaps of distance D, pairs (J, J + D) for the J whose bit D is clear.
template <int B, int D, int K = 0>
inline void stage(__m256i r[8], __m256i m) {
    if constexpr (K < 4) {
        constexpr int J = ((K & ~(D - 1)) << 1) | (K & (D - 1));  // the K-th index with bit D clear
        swap_bits<D, maybe_nonzero(B, 2 * D, J), maybe_nonzero(B, 2 * D, J + D)>(r[J], r[J + D], m);
        stage<B, D, K + 1>(r, m);
    }
}

// The 8 code vectors of chunk c at width B, half-tile base `base`: byte r*4+j of vector i is the
// code of row r, column c*32 + 4i + j. In every byte lane the planes hold an 8x8 bit matrix
// (vector j = plane B-1-j carries bit j of the 8 codes of that lane, code i at bit i) and the codes
// are its transpose: three stages of delta swaps (distance 4, 2, 1), 12 swaps in all instead of a
// shift and a mask per plane and code vector; planes above width B are zero and their swaps shrink.
template <int B>
inline void unpack_chunk(const uint8_t* base, int64_t plane_stride, int64_t c, __m256i q[8]) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
        q[j] = j < B ? _mm256_loadu_si256((const __m256i*)(base + (B - 1 - j) * plane_stride + c * kBlockBytes))
                     : _mm256_setzero_si256();
    }
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x33), m1 = _mm256_set1_epi8(0x55);
    stage<B, 4>(q, m4);
    stage<B, 2>(q, m2);
    stage<B, 1>(q, m1);
}

inline const uint8_t* half_base(const LayerView& L, int64_t t, int h) {
    return L.planes + t * L.n_chunks * kBlockBytes + h * 32;
}

// Codes of width B for half h (rows 8h..8h+7) of tile t into qbuf[c][i][32].
template <int B>
void unpack_half(const LayerView& L, int64_t t, int h, uint8_t* qbuf) {
    const uint8_t* base = half_base(L, t, h);
    for (int64_t c = 0; c < L.n_chunks; ++c) {
        __m256i q[8];
        unpack_chunk<B>(base, L.plane_stride, c, q);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) _mm256_store_si256((__m256i*)(qbuf + (c * 8 + i) * 32), q[i]);
    }
}

// How many maddubs results (int16) can be summed before widening without overflow.
template <int B>
constexpr int kSums = B <= 4 ? 8 : (B == 5 ? 4 : (B == 6 ? 2 : 1));

// Rows rows[0..MB) of one segment against half h of tile t. FUSED (one row): rebuild the codes per
// chunk in registers; otherwise read them from qbuf, filled once per half-tile. REF (width 8 only):
// refined rows, the codes also meet the residual activations (second accumulator).
template <int B, int MB, bool FUSED = false, bool REF = false>
void dot_half(const LayerView& L, const ActView& A, const Segment& seg, const int32_t* rows, int64_t t, int h,
              const uint8_t* qbuf) {
    const int64_t K = L.k;
    const int64_t cpg = L.group_size / kChunk;
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const uint16_t* sc_p = L.scales + seg.widx * L.width_stride + t * L.n_groups * kTileRows + h * 8;
    const uint16_t* mn_p = L.mins + seg.widx * L.width_stride + t * L.n_groups * kTileRows + h * 8;
    const int8_t* xr[MB];
    const float* dxr[MB];
    const float* xsr[MB];
    const int32_t* xqs[MB];
    const int8_t* xr2[MB];
    const float* dxr2[MB];
    __m256 facc[MB];
    static_assert(!REF || B == 8, "refined rows are width 8 only");
#pragma GCC unroll 4
    for (int mb = 0; mb < MB; ++mb) {
        if (REF) {
            xr2[mb] = A.xq2 + rows[mb] * K;
            dxr2[mb] = A.dx2 + rows[mb] * L.n_chunks;
        }
        xr[mb] = A.xq + rows[mb] * K;
        dxr[mb] = A.dx + rows[mb] * L.n_chunks;
        xsr[mb] = A.xsum + rows[mb] * L.n_groups;
        xqs[mb] = A.xqsum + rows[mb] * L.n_chunks;
        facc[mb] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < L.n_groups; ++g) {
        const __m256 sc = load_half8(sc_p + g * kTileRows);
        const __m256 mn = _mm256_fmadd_ps(_mm256_set1_ps((float)(1 << (B - 1))), sc, load_half8(mn_p + g * kTileRows));
        for (int64_t cc = 0; cc < cpg; ++cc) {
            const int64_t c = g * cpg + cc;
            __m256i qc[8];
            if (FUSED) unpack_chunk<B>(half_base(L, t, h), L.plane_stride, c, qc);
            __m256i iacc[MB], iacc2[MB];
#pragma GCC unroll 4
            for (int mb = 0; mb < MB; ++mb) {
                if (REF) iacc2[mb] = _mm256_setzero_si256();  // width 8: centred products, as iacc
                // codes enter centred, q - 2^(b-1) (see elastic_avx512.cpp); width 8 computes the centred
                // products directly (maddubs needs |u8| * |s8| pairs under 2^15), narrower widths as
                // sum q x - 2^(b-1) sum x, in integers
                iacc[mb] = B == 8 ? _mm256_setzero_si256() : _mm256_set1_epi32(-(1 << (B - 1)) * xqs[mb][c]);
            }
#pragma GCC unroll 8
            for (int i0 = 0; i0 < 8; i0 += kSums<B>) {
                __m256i p16[MB], p16r[MB];
#pragma GCC unroll 8
                for (int i = i0; i < i0 + kSums<B>; ++i) {
                    const __m256i qv = FUSED ? qc[i] : _mm256_load_si256((const __m256i*)(qbuf + (c * 8 + i) * 32));
                    __m256i qs, qa;
                    if (B == 8) {
                        qs = _mm256_xor_si256(qv, flip);
                        qa = _mm256_abs_epi8(qs);
                    }
#pragma GCC unroll 4
                    for (int mb = 0; mb < MB; ++mb) {
                        int32_t x4;
                        std::memcpy(&x4, xr[mb] + c * kChunk + 4 * i, 4);
                        const __m256i xb = _mm256_set1_epi32(x4);
                        const __m256i p = B == 8 ? _mm256_maddubs_epi16(qa, _mm256_sign_epi8(xb, qs))
                                                 : _mm256_maddubs_epi16(qv, xb);
                        p16[mb] = i == i0 ? p : _mm256_add_epi16(p16[mb], p);
                        if (REF) {  // kSums<8> == 1: one product per widening, as above
                            std::memcpy(&x4, xr2[mb] + c * kChunk + 4 * i, 4);
                            p16r[mb] = _mm256_maddubs_epi16(qa, _mm256_sign_epi8(_mm256_set1_epi32(x4), qs));
                        }
                    }
                }
#pragma GCC unroll 4
                for (int mb = 0; mb < MB; ++mb) {
                    iacc[mb] = _mm256_add_epi32(iacc[mb], _mm256_madd_epi16(p16[mb], ones16));
                    if (REF) iacc2[mb] = _mm256_add_epi32(iacc2[mb], _mm256_madd_epi16(p16r[mb], ones16));
                }
            }
#pragma GCC unroll 4
            for (int mb = 0; mb < MB; ++mb) {
                const __m256 s = _mm256_mul_ps(sc, _mm256_set1_ps(dxr[mb][c]));
                facc[mb] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[mb]), s, facc[mb]);
                if (REF) {
                    const __m256 s2 = _mm256_mul_ps(sc, _mm256_set1_ps(dxr2[mb][c]));
                    facc[mb] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc2[mb]), s2, facc[mb]);
                }
            }
        }
#pragma GCC unroll 4
        for (int mb = 0; mb < MB; ++mb) facc[mb] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xsr[mb][g]), facc[mb]);
    }
    const uint16_t* lb = L.lora_b + t * L.rank_max * kTileRows + h * 8;
    for (int j = 0; j < seg.rank; ++j) {
        const __m256 bv = load_half8(lb + j * kTileRows);
#pragma GCC unroll 4
        for (int mb = 0; mb < MB; ++mb) {
            facc[mb] = _mm256_fmadd_ps(bv, _mm256_set1_ps(A.u[rows[mb] * L.rank_max + j]), facc[mb]);
        }
    }
    const int64_t n0 = t * kTileRows + h * 8;
    const int64_t valid = imin(8, L.n - n0);
    if (L.bias) {
        const __m256 bias = _mm256_loadu_ps(L.bias + n0);
#pragma GCC unroll 4
        for (int mb = 0; mb < MB; ++mb) facc[mb] = _mm256_add_ps(facc[mb], bias);
    }
#pragma GCC unroll 4
    for (int mb = 0; mb < MB; ++mb) {
        float* o = A.out + rows[mb] * L.n + n0;
        if (valid == 8) {
            _mm256_storeu_ps(o, facc[mb]);
        } else {
            alignas(32) float tmp[8];
            _mm256_store_ps(tmp, facc[mb]);
            for (int64_t j = 0; j < valid; ++j) o[j] = tmp[j];
        }
    }
}

template <int B, bool REF>
void tile_segment_ref(const LayerView& L, const ActView& A, const Segment& seg, int64_t t, uint8_t* qbuf) {
    for (int h = 0; h < 2; ++h) {
        if (t * kTileRows + h * 8 >= L.n) break;
        if (seg.n_rows == 1) {  // decode: the codes stay in registers, no round trip through qbuf
            dot_half<B, 1, true, REF>(L, A, seg, seg.rows, t, h, qbuf);
            continue;
        }
        unpack_half<B>(L, t, h, qbuf);
        int64_t mi = 0;
        for (; mi + 4 <= seg.n_rows; mi += 4) dot_half<B, 4, false, REF>(L, A, seg, seg.rows + mi, t, h, qbuf);
        switch (seg.n_rows - mi) {
            case 3: dot_half<B, 3, false, REF>(L, A, seg, seg.rows + mi, t, h, qbuf); break;
            case 2: dot_half<B, 2, false, REF>(L, A, seg, seg.rows + mi, t, h, qbuf); break;
            case 1: dot_half<B, 1, false, REF>(L, A, seg, seg.rows + mi, t, h, qbuf); break;
            default: break;
        }
    }
}

// The kernel run_tiles (elastic_tiles.h) drives: one segment's rows against tile t.
struct Avx2Kernel {
    template <int B>
    static void segment(const LayerView& L, const ActView& A, const Segment& seg, int64_t t, uint8_t* qbuf) {
        if constexpr (B == 8) {
            if (seg.refine) {
                tile_segment_ref<B, true>(L, A, seg, t, qbuf);
                return;
            }
        }
        tile_segment_ref<B, false>(L, A, seg, t, qbuf);
    }
};

}  // namespace

void tiles_avx2(const LayerView& L, const ActView& A, const Segment* segs, int n_segs, int64_t t0, int64_t t1,
                uint8_t* scratch) {
    run_tiles<Avx2Kernel>(L, A, segs, n_segs, t0, t1, scratch);
}

void rows_avx2(const float* x, int64_t m0, int64_t m1, const LayerView& L, const int32_t* row_rank, int8_t* xq,
               float* dx, int32_t* xqsum, float* xsum, float* u) {
    const int64_t K = L.k;
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t m = m0; m < m1; ++m) {
        const float* xr = x + m * K;
        for (int64_t c = 0; c < L.n_chunks; ++c) {
            const float* xc = xr + c * kChunk;
            __m256 v[4];
            __m256 amax = _mm256_setzero_ps();
            for (int j = 0; j < 4; ++j) {
                v[j] = _mm256_loadu_ps(xc + 8 * j);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
            }
            const float d = hmax8(amax) / 127.f;
            const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
            __m256i iv[4];
            for (int j = 0; j < 4; ++j) iv[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));  // half to even
            const __m256i p01 = _mm256_packs_epi32(iv[0], iv[1]);
            const __m256i p23 = _mm256_packs_epi32(iv[2], iv[3]);
            __m256i b = _mm256_packs_epi16(p01, p23);
            b = _mm256_permutevar8x32_epi32(b, perm);
            b = _mm256_max_epi8(b, _mm256_set1_epi8(-127));
            _mm256_storeu_si256((__m256i*)(xq + m * K + c * kChunk), b);
            dx[m * L.n_chunks + c] = d;
            // sum of the 32 int8: maddubs against 1s, then madd against 1s
            const __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), b);
            const __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            xqsum[m * L.n_chunks + c] = _mm_cvtsi128_si32(s4);
        }
        for (int64_t g = 0; g < L.n_groups; ++g) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t j = 0; j < L.group_size; j += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xr + g * L.group_size + j));
            xsum[m * L.n_groups + g] = hsum8(s);
        }
        for (int j = 0; j < row_rank[m]; ++j) {
            const uint16_t* a = L.lora_a + (int64_t)j * K;
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), load_half8(a + k), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k + 8), load_half8(a + k + 8), s1);
            }
            u[m * L.rank_max + j] = hsum8(_mm256_add_ps(s0, s1));
        }
    }
}

// residual_generic (elastic_common.h) in AVX2, bit-identical to the portable one: the product xq dx
// rounded to fp32 before the difference (mul then sub, no fma), round half to even, clamp to +-127.
void residual_avx2(const float* x, int64_t m0, int64_t m1, const LayerView& L, const int8_t* xq, const float* dx,
                   int8_t* xq2, float* dx2, int32_t* xqsum2) {
    const int64_t K = L.k;
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t m = m0; m < m1; ++m) {
        for (int64_t c = 0; c < L.n_chunks; ++c) {
            const int64_t k0 = m * K + c * kChunk;
            const __m256 d1 = _mm256_set1_ps(dx[m * L.n_chunks + c]);
            __m256 r[4];
            __m256 amax = _mm256_setzero_ps();
            for (int j = 0; j < 4; ++j) {
                const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(xq + k0 + 8 * j)));
                __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d1);
                __asm__("" : "+x"(p));  // keep the rounded product: GCC would contract mul + sub into one fma
                r[j] = _mm256_sub_ps(_mm256_loadu_ps(x + k0 + 8 * j), p);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, r[j]));
            }
            const float d = hmax8(amax) / 127.f;
            const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
            __m256i iv[4];
            for (int j = 0; j < 4; ++j) iv[j] = _mm256_cvtps_epi32(_mm256_mul_ps(r[j], id));  // half to even
            __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
            b = _mm256_permutevar8x32_epi32(b, perm);
            b = _mm256_max_epi8(b, _mm256_set1_epi8(-127));
            _mm256_storeu_si256((__m256i*)(xq2 + k0), b);
            dx2[m * L.n_chunks + c] = d;
            const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), b), _mm256_set1_epi16(1));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            xqsum2[m * L.n_chunks + c] = _mm_cvtsi128_si32(s4);
        }
    }
}

}  // namespace quept

#pragma GCC pop_options
#endif  // QUEPT_X86
