// Portable plain C++ path of the fused layer ops' inner loops (fused_ops.h): any CPU, and the
// fallback of the SIMD paths for head sizes they do not take.
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "fused_ops.h"

namespace quept {

namespace {

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return static_cast<float>(c10::Half(*p, c10::Half::from_bits())); }

template <typename KV>
void attend_portable(const AttnTask& t) {
    const int64_t L = t.L, Dh = t.Dh;
    const KV* k = static_cast<const KV*>(t.k);
    const KV* v = static_cast<const KV*>(t.v);
    for (int64_t g = 0; g < t.G; ++g) {
        const float* qh = t.q + g * Dh;
        float* p = t.scores + g * L;
        float mx = -INFINITY;
        for (int64_t l = 0; l < L; ++l) {
            const KV* kr = k + t.slots[l] * t.row_stride;
            float s = 0.f;
            for (int64_t d = 0; d < Dh; ++d) s += qh[d] * load1(kr + d);
            p[l] = s * t.scale;
            mx = p[l] > mx ? p[l] : mx;
        }
        float sum = 0.f;
        for (int64_t l = 0; l < L; ++l) {
            p[l] = std::exp(p[l] - mx);
            sum += p[l];
        }
        float* oh = t.out + g * Dh;
        for (int64_t d = 0; d < Dh; ++d) oh[d] = 0.f;
        for (int64_t l = 0; l < L; ++l) {
            const float w = p[l] / sum;
            const KV* vr = v + t.slots[l] * t.row_stride;
            for (int64_t d = 0; d < Dh; ++d) oh[d] += w * load1(vr + d);
        }
    }
}

}  // namespace

void attend_generic(const AttnTask& t) {
    if (t.half) {
        attend_portable<uint16_t>(t);
    } else {
        attend_portable<float>(t);
    }
}

void silu_mul_generic(const float* g, const float* u, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

}  // namespace quept
