// AVX2 + FMA + F16C paths of the fused layer ops (fused_ops.h), for CPUs without AVX-512: the same
// arithmetic as fused_avx512.cpp, 8 lanes at a time. Exponentials: the Cephes expf polynomial of the
// AVX-512 file, with 2^n built in the exponent bits (AVX2 has no scalef). Decode attention: the
// scaled queries of a KV head sit in a small stack buffer (16 ymm registers cannot hold G x Dh
// floats), each key meets every query head while it is in L1, and the output accumulates one
// 8-column slice at a time in registers, reading each value row once per slice.
// Compiled without -mavx2: see the note on target pragmas in elastic_avx2.cpp.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "fused_ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "avx2_lanes.h"  // after the pragma: its functions are compiled for AVX2 (see the header)

namespace quept {
namespace {

constexpr int kMaxDh = 256;    // head dims up to this take the SIMD path

// exp(x) (fused_ops.h): 0 below kExpLo; 2^n built in the exponent bits, n in [-126, 127].
inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x));
    __m256 p = _mm256_set1_ps(kExpPoly[0]);
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The sums of the 8 lanes of a, b, c and d.
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // [a b c d | a b c d] halves
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return load_half8(p); }

// Lanes [0, n) set, n in 0..8 (a maskload/maskstore mask).
inline __m256i lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <typename KV>
void attend(const AttnTask& t) {
    const KV* k = static_cast<const KV*>(t.k);
    const KV* v = static_cast<const KV*>(t.v);
    const int64_t L = t.L, G = t.G, Dh = t.Dh;
    alignas(32) float qs[kAttnMaxG * kMaxDh];  // the scaled queries [G][Dh]
    for (int64_t i = 0; i < G * Dh; i += 8) _mm256_store_ps(qs + i, _mm256_mul_ps(load8(t.q + i), _mm256_set1_ps(t.scale)));
    // scores[g][l] = q_g . k_l, four keys at a time (one reduction for four sums)
    int64_t l4 = 0;
    for (; l4 + 4 <= L; l4 += 4) {
        const KV* kr[4];
        for (int r = 0; r < 4; ++r) kr[r] = k + t.slots[l4 + r] * t.row_stride;
        for (int64_t g = 0; g < G; ++g) {
            const float* qg = qs + g * Dh;
            __m256 acc[4];
            for (int r = 0; r < 4; ++r) acc[r] = _mm256_mul_ps(_mm256_load_ps(qg), load8(kr[r]));
            for (int64_t d = 8; d < Dh; d += 8) {
                const __m256 qv = _mm256_load_ps(qg + d);
                for (int r = 0; r < 4; ++r) acc[r] = _mm256_fmadd_ps(qv, load8(kr[r] + d), acc[r]);
            }
            _mm_storeu_ps(t.scores + g * L + l4, reduce4(acc[0], acc[1], acc[2], acc[3]));
        }
    }
    for (int64_t l = l4; l < L; ++l) {
        const KV* kr = k + t.slots[l] * t.row_stride;
        for (int64_t g = 0; g < G; ++g) {
            const float* qg = qs + g * Dh;
            __m256 acc = _mm256_mul_ps(_mm256_load_ps(qg), load8(kr));
            for (int64_t d = 8; d < Dh; d += 8) acc = _mm256_fmadd_ps(_mm256_load_ps(qg + d), load8(kr + d), acc);
            t.scores[g * L + l] = hsum8(acc);
        }
    }
    // softmax per head, in place; the tail (L % 8 keys) through masked loads and stores
    const int64_t body = L - L % 8;
    const __m256i tail = lanes(L - body);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t g = 0; g < G; ++g) {
        float* s = t.scores + g * L;
        __m256 mx = ninf;
        for (int64_t l = 0; l < body; l += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + l));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, _mm256_maskload_ps(s + body, tail), _mm256_castsi256_ps(tail)));
        const __m256 m = _mm256_set1_ps(hmax8(mx));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t l = 0; l < body; l += 8) {
            const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + l), m));
            _mm256_storeu_ps(s + l, e);
            sum = _mm256_add_ps(sum, e);
        }
        if (body < L) {
            const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(_mm256_maskload_ps(s + body, tail), m)),
                                           _mm256_castsi256_ps(tail));
            _mm256_maskstore_ps(s + body, tail, e);
            sum = _mm256_add_ps(sum, e);
        }
        const __m256 inv = _mm256_set1_ps(1.f / hsum8(sum));
        for (int64_t l = 0; l < body; l += 8) _mm256_storeu_ps(s + l, _mm256_mul_ps(_mm256_loadu_ps(s + l), inv));
        if (body < L) _mm256_maskstore_ps(s + body, tail, _mm256_mul_ps(_mm256_maskload_ps(s + body, tail), inv));
    }
    // out[g][d0 : d0 + 8] = sum_l w[g][l] v_l[d0 : d0 + 8], one 8-column slice at a time
    for (int64_t d0 = 0; d0 < Dh; d0 += 8) {
        __m256 o[kAttnMaxG];
        for (int64_t g = 0; g < G; ++g) o[g] = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; ++l) {
            const __m256 vv = load8(v + t.slots[l] * t.row_stride + d0);
            for (int64_t g = 0; g < G; ++g) o[g] = _mm256_fmadd_ps(_mm256_set1_ps(t.scores[g * L + l]), vv, o[g]);
        }
        for (int64_t g = 0; g < G; ++g) _mm256_storeu_ps(t.out + g * Dh + d0, o[g]);
    }
}

}  // namespace

void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    if (i < n) {
        const __m256i tail = lanes(n - i);
        const __m256 gv = _mm256_maskload_ps(g + i, tail);
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_maskstore_ps(out + i, tail,
                            _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_maskload_ps(u + i, tail)));
    }
}

void attend_avx2(const AttnTask& t) {
    if (t.Dh % 8 || t.Dh > kMaxDh) {
        attend_generic(t);
        return;
    }
    if (t.half) {
        attend<uint16_t>(t);
    } else {
        attend<float>(t);
    }
}

}  // namespace quept

#pragma GCC pop_options
#endif
