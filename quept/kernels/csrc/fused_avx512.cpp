// AVX-512 paths of the fused layer ops (fused_ops.h). Exponentials are taken 16 at a time with a
// polynomial (Cephes expf, about 1 ulp). Decode attention: the G query heads of a KV head stay in
// registers while the keys stream past once, and the weighted values accumulate in registers.
// Compiled without -mavx512*: see the note on target pragmas in elastic_avx2.cpp.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "fused_ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")

namespace quept {
namespace {


// exp(x) (fused_ops.h): 0 below kExpLo.
inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), _mm512_set1_ps(kExpHi));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x));
    __m512 p = _mm512_set1_ps(kExpPoly[0]);
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// The sums of the 16 lanes of a, b, c and d, in lanes 0..3.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    // 128-bit chunks: [a0+a2, a1+a3, b0+b2, b1+b3] and likewise for c, d
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    // chunk j holds four partial sums of vector j (a, b, c, d)
    __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));  // + the other 64-bit half of the chunk
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));  // + the neighbour: every lane of chunk j = sum j
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                          12, 8, 4, 0), s));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

template <int NV, typename KV>
void attend(const AttnTask& t) {
    const KV* k = static_cast<const KV*>(t.k);
    const KV* v = static_cast<const KV*>(t.v);
    const int64_t L = t.L, G = t.G;
    __m512 q[kAttnMaxG][NV];
    for (int64_t g = 0; g < G; ++g) {
        for (int i = 0; i < NV; ++i) q[g][i] = _mm512_mul_ps(_mm512_loadu_ps(t.q + g * NV * 16 + i * 16), _mm512_set1_ps(t.scale));
    }
    // scores[g][l] = (q_g . k_l) / sqrt(Dh), four keys at a time (one reduction tree for four sums)
    int64_t l4 = 0;
    for (; l4 + 4 <= L; l4 += 4) {
        __m512 kv[4][NV];
        for (int r = 0; r < 4; ++r) {
            const KV* kr = k + t.slots[l4 + r] * t.row_stride;
            for (int i = 0; i < NV; ++i) kv[r][i] = load16(kr + i * 16);
        }
        for (int64_t g = 0; g < G; ++g) {
            __m512 acc[4];
            for (int r = 0; r < 4; ++r) {
                acc[r] = _mm512_mul_ps(q[g][0], kv[r][0]);
                for (int i = 1; i < NV; ++i) acc[r] = _mm512_fmadd_ps(q[g][i], kv[r][i], acc[r]);
            }
            _mm_storeu_ps(t.scores + g * L + l4, reduce4(acc[0], acc[1], acc[2], acc[3]));
        }
    }
    for (int64_t l = l4; l < L; ++l) {
        const KV* kr = k + t.slots[l] * t.row_stride;
        __m512 kv[NV];
        for (int i = 0; i < NV; ++i) kv[i] = load16(kr + i * 16);
        for (int64_t g = 0; g < G; ++g) {
            __m512 acc = _mm512_mul_ps(q[g][0], kv[0]);
            for (int i = 1; i < NV; ++i) acc = _mm512_fmadd_ps(q[g][i], kv[i], acc);
            t.scores[g * L + l] = _mm512_reduce_add_ps(acc);
        }
    }
    // softmax per head, in place
    for (int64_t g = 0; g < G; ++g) {
        float* s = t.scores + g * L;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        int64_t l = 0;
        for (; l + 16 <= L; l += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + l));
        const __mmask16 tail = (__mmask16)((1u << (L - l)) - 1u);  // L - l < 16
        mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, s + l));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (l = 0; l + 16 <= L; l += 16) {
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + l), m));
            _mm512_storeu_ps(s + l, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (tail) {
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + l), m));
            _mm512_mask_storeu_ps(s + l, tail, e);
            sum = _mm512_mask_add_ps(sum, tail, sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
        for (l = 0; l + 16 <= L; l += 16) _mm512_storeu_ps(s + l, _mm512_mul_ps(_mm512_loadu_ps(s + l), inv));
        if (tail) _mm512_mask_storeu_ps(s + l, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + l), inv));
    }
    // out[g] = sum_l w[g][l] v_l
    __m512 o[kAttnMaxG][NV];
    for (int64_t g = 0; g < G; ++g) {
        for (int i = 0; i < NV; ++i) o[g][i] = _mm512_setzero_ps();
    }
    for (int64_t l = 0; l < L; ++l) {
        const KV* vr = v + t.slots[l] * t.row_stride;
        __m512 vv[NV];
        for (int i = 0; i < NV; ++i) vv[i] = load16(vr + i * 16);
        for (int64_t g = 0; g < G; ++g) {
            const __m512 w = _mm512_set1_ps(t.scores[g * L + l]);
            for (int i = 0; i < NV; ++i) o[g][i] = _mm512_fmadd_ps(w, vv[i], o[g][i]);
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        for (int i = 0; i < NV; ++i) _mm512_storeu_ps(t.out + g * NV * 16 + i * 16, o[g][i]);
    }
}

template <typename KV>
void attend_dh(const AttnTask& t) {
    switch (t.Dh / 16) {
        case 1: attend<1, KV>(t); break;
        case 2: attend<2, KV>(t); break;
        case 3: attend<3, KV>(t); break;
        case 4: attend<4, KV>(t); break;
        case 5: attend<5, KV>(t); break;
        case 6: attend<6, KV>(t); break;
        case 7: attend<7, KV>(t); break;
        case 8: attend<8, KV>(t); break;
        default: attend_generic(t); break;
    }
}

}  // namespace

void silu_mul_avx512(const float* g, const float* u, float* out, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
    if (i < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 gv = _mm512_maskz_loadu_ps(tail, g + i);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_mask_storeu_ps(out + i, tail,
                              _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(tail, u + i)));
    }
}

void attend_avx512(const AttnTask& t) {
    if (t.Dh % 16) {
        attend_avx2(t);
        return;
    }
    if (t.half) {
        attend_dh<uint16_t>(t);
    } else {
        attend_dh<float>(t);
    }
}

}  // namespace quept

#pragma GCC pop_options
#endif
