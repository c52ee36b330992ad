// Portable plain C++ path of the native elastic linear (any CPU). Same layout and the same integer
// arithmetic as the SIMD paths, so results agree with them up to the order of the fp32 additions.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "elastic_common.h"
#include "elastic_tiles.h"

namespace quept {

void rows_generic(const float* x, int64_t m0, int64_t m1, const LayerView& L, const int32_t* row_rank, int8_t* xq,
                  float* dx, int32_t* xqsum, float* xsum, float* u) {
    const int64_t K = L.k;
    for (int64_t m = m0; m < m1; ++m) {
        const float* xr = x + m * K;
        for (int64_t c = 0; c < L.n_chunks; ++c) {
            const float* xc = xr + c * kChunk;
            float amax = 0.f;
            for (int j = 0; j < kChunk; ++j) amax = std::fmax(amax, std::fabs(xc[j]));
            const float d = amax / 127.f;
            const float id = d > 0.f ? 1.f / d : 0.f;
            int32_t qsum = 0;
            for (int j = 0; j < kChunk; ++j) {
                float v = std::nearbyint(xc[j] * id);  // round half to even, as cvtps2dq
                v = std::fmin(127.f, std::fmax(-127.f, v));
                xq[m * K + c * kChunk + j] = (int8_t)v;
                qsum += (int32_t)v;
            }
            dx[m * L.n_chunks + c] = d;
            xqsum[m * L.n_chunks + c] = qsum;
        }
        for (int64_t g = 0; g < L.n_groups; ++g) {
            float s = 0.f;
            for (int64_t j = 0; j < L.group_size; ++j) s += xr[g * L.group_size + j];
            xsum[m * L.n_groups + g] = s;
        }
        for (int j = 0; j < row_rank[m]; ++j) {
            const uint16_t* a = L.lora_a + (int64_t)j * K;
            float s = 0.f;
            for (int64_t k = 0; k < K; ++k) s += xr[k] * half_to_float(a[k]);
            u[m * L.rank_max + j] = s;
        }
    }
}

void residual_generic(const float* x, int64_t m0, int64_t m1, const LayerView& L, const int8_t* xq, const float* dx,
                      int8_t* xq2, float* dx2, int32_t* xqsum2) {
    const int64_t K = L.k;
    for (int64_t m = m0; m < m1; ++m) {
        for (int64_t c = 0; c < L.n_chunks; ++c) {
            const int64_t k0 = m * K + c * kChunk;
            const float d1 = dx[m * L.n_chunks + c];
            float r[kChunk];
            float amax = 0.f;
            for (int j = 0; j < kChunk; ++j) {
                const float p = (float)xq[k0 + j] * d1;  // rounded product, then the difference (no fma)
                r[j] = x[k0 + j] - p;
                amax = std::fmax(amax, std::fabs(r[j]));
            }
            const float d = amax / 127.f;
            const float id = d > 0.f ? 1.f / d : 0.f;
            int32_t qsum = 0;
            for (int j = 0; j < kChunk; ++j) {
                float v = std::nearbyint(r[j] * id);
                v = std::fmin(127.f, std::fmax(-127.f, v));
                xq2[k0 + j] = (int8_t)v;
                qsum += (int32_t)v;
            }
            dx2[m * L.n_chunks + c] = d;
            xqsum2[m * L.n_chunks + c] = qsum;
        }
    }
}

// qbuf: [16 rows][K] codes of width `bits` for tile t.
static void unpack_tile(const LayerView& L, int bits, int64_t t, uint8_t* qbuf) {
    const int64_t K = L.k;
    std::memset(qbuf, 0, (size_t)(kTileRows * K));
    for (int p = 0; p < bits; ++p) {
        const int pos = bits - 1 - p;
        const uint8_t* blk = L.planes + p * L.plane_stride + t * L.n_chunks * kBlockBytes;
        for (int64_t c = 0; c < L.n_chunks; ++c) {
            for (int r = 0; r < kTileRows; ++r) {
                for (int j = 0; j < 4; ++j) {
                    const uint8_t byte = blk[c * kBlockBytes + r * 4 + j];
                    for (int i = 0; i < 8; ++i) {
                        qbuf[r * K + c * kChunk + 4 * i + j] |= (uint8_t)(((byte >> i) & 1u) << pos);
                    }
                }
            }
        }
    }
}

namespace {

// One segment's rows against tile t: unpack the tile's codes once, then plain integer dot products.
void tile_segment(const LayerView& L, const ActView& A, const Segment& seg, int64_t t, uint8_t* scratch) {
    const int64_t K = L.k;
    const int64_t cpg = L.group_size / kChunk;
    unpack_tile(L, seg.bits, t, scratch);
    const int32_t centre = 1 << (seg.bits - 1);  // codes enter centred (see elastic_avx512.cpp)
    const uint16_t* sc = L.scales + seg.widx * L.width_stride + t * L.n_groups * kTileRows;
    const uint16_t* mn = L.mins + seg.widx * L.width_stride + t * L.n_groups * kTileRows;
    const uint16_t* lb = L.lora_b + t * L.rank_max * kTileRows;
    for (int64_t mi = 0; mi < seg.n_rows; ++mi) {
        const int64_t m = seg.rows[mi];
        const int8_t* xq = A.xq + m * K;
        const int8_t* xq2 = seg.refine ? A.xq2 + m * K : nullptr;
        for (int r = 0; r < kTileRows; ++r) {
            const int64_t n = t * kTileRows + r;
            if (n >= L.n) break;
            const uint8_t* q = scratch + r * K;
            float acc = 0.f;
            for (int64_t g = 0; g < L.n_groups; ++g) {
                float gs = 0.f;
                for (int64_t cc = 0; cc < cpg; ++cc) {
                    const int64_t c = g * cpg + cc;
                    int32_t isum = 0;
                    for (int j = 0; j < kChunk; ++j) isum += ((int32_t)q[c * kChunk + j] - centre) * xq[c * kChunk + j];
                    gs += (float)isum * A.dx[m * L.n_chunks + c];
                    if (xq2) {
                        int32_t isum2 = 0;
                        for (int j = 0; j < kChunk; ++j) isum2 += ((int32_t)q[c * kChunk + j] - centre) * xq2[c * kChunk + j];
                        gs += (float)isum2 * A.dx2[m * L.n_chunks + c];
                    }
                }
                const float scale = half_to_float(sc[g * kTileRows + r]);
                const float min = half_to_float(mn[g * kTileRows + r]) + (float)centre * scale;
                acc += scale * gs + min * A.xsum[m * L.n_groups + g];
            }
            for (int j = 0; j < seg.rank; ++j) acc += half_to_float(lb[j * kTileRows + r]) * A.u[m * L.rank_max + j];
            if (L.bias) acc += L.bias[n];
            A.out[m * L.n + n] = acc;
        }
    }
}

struct GenericKernel {
    template <int B>
    static void segment(const LayerView& L, const ActView& A, const Segment& seg, int64_t t, uint8_t* scratch) {
        tile_segment(L, A, seg, t, scratch);  // the width is read at run time from seg.bits
    }
};

}  // namespace

void tiles_generic(const LayerView& L, const ActView& A, const Segment* segs, int n_segs, int64_t t0, int64_t t1,
                   uint8_t* scratch) {
    run_tiles<GenericKernel>(L, A, segs, n_segs, t0, t1, scratch);
}

}  // namespace quept
