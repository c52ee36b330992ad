// Lane reductions and fp16 loads shared by the AVX2 files (elastic_avx2.cpp, fused_avx2.cpp).
// Include it *after* `#pragma GCC target("avx2,fma,f16c")`: the functions live in an anonymous
// namespace, so each including file gets its own AVX2 copy and nothing leaks into other code.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace quept {
namespace {

inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline __m256 load_half8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

}  // namespace
}  // namespace quept
