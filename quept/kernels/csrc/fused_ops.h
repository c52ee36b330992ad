// The inner loops of the fused layer ops (fused_ops.cpp) that have a SIMD path: decode attention of
// one (sequence, KV head) pair and SiLU(gate) * up. No torch headers: the AVX2 and AVX-512 files are
// compiled with target pragmas (see elastic_avx2.cpp).
#pragma once

#include <cstdint>

namespace quept {

// exp(x) on the SIMD paths (Cephes expf, about 1 ulp): x = n ln2 + r with ln2 split in two parts,
// exp(r) = 1 + r + r^2 p(r), p by Horner from kExpPoly[0]; 2^n applied last; x clamped to [kExpLo, kExpHi].
constexpr float kExpLo = -87.3f, kExpHi = 88.f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// The SIMD attention paths keep this many query heads' accumulators in registers at most; the
// caller (paged_attention) splits a larger group of query heads per KV head into tasks of this size.
constexpr int64_t kAttnMaxG = 8;

// The G query heads (G <= kAttnMaxG) of one KV head of one query row over its L cached keys.
struct AttnTask {
    const float* q;          // [G][Dh] query heads
    const void* k;           // flat key cache, fp32 or fp16 (half); key l of this head is at slots[l] * row_stride
    const void* v;           // flat value cache, the same layout and type
    const int64_t* slots;    // [L]
    int64_t L, G, Dh;
    int64_t row_stride;      // floats between consecutive cache slots (Hkv * Dh), head offset already in k/v
    float scale;             // 1 / sqrt(Dh)
    float* out;              // [G][Dh], written (not accumulated)
    float* scores;           // scratch [G][L]
    bool half;               // k and v hold IEEE fp16
};

void attend_generic(const AttnTask& t);
// out[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i], i < n
void silu_mul_generic(const float* g, const float* u, float* out, int64_t n);
#if defined(__x86_64__) && defined(__GNUC__)
void attend_avx512(const AttnTask& t);  // Dh % 16 == 0, else the AVX2 path
void silu_mul_avx512(const float* g, const float* u, float* out, int64_t n);
void attend_avx2(const AttnTask& t);  // Dh % 8 == 0 and Dh <= 256, else the generic path
void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n);
#endif

}  // namespace quept
