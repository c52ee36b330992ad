// Bit-plane packing and row tiling of one elastic linear (elastic_pack.h; layout in elastic_common.h).
#include "elastic_pack.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "arena.h"
#include "elastic_common.h"

namespace quept {

at::Tensor pack_planes(const at::Tensor& codes, int64_t n_tiles) {
    const int64_t N = codes.size(0), K = codes.size(1), n_chunks = K / kChunk;
    auto planes = arena_empty({8, n_tiles, n_chunks, kBlockBytes}, at::kByte);  // zeroed
    const uint8_t* src = codes.data_ptr<uint8_t>();
    uint8_t* dst = planes.data_ptr<uint8_t>();
    const int64_t plane_stride = n_tiles * n_chunks * kBlockBytes;
    at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            for (int r = 0; r < kTileRows; ++r) {
                const int64_t n = t * kTileRows + r;
                if (n >= N) break;
                for (int64_t c = 0; c < n_chunks; ++c) {
                    for (int j = 0; j < 4; ++j) {
                        uint8_t bytes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                        for (int i = 0; i < 8; ++i) {
                            const uint8_t code = src[n * K + c * kChunk + 4 * i + j];
                            for (int p = 0; p < 8; ++p) bytes[p] |= (uint8_t)(((code >> (7 - p)) & 1u) << i);
                        }
                        const int64_t off = (t * n_chunks + c) * kBlockBytes + r * 4 + j;
                        for (int p = 0; p < 8; ++p) dst[p * plane_stride + off] = bytes[p];
                    }
                }
            }
        }
    });
    return planes;
}

at::Tensor tile_rows(const at::Tensor& t, int64_t n_tiles) {
    const int64_t N = t.size(-2), pad = n_tiles * kTileRows - N;
    auto h = t.to(at::kHalf);
    if (pad) {
        std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
        shape[shape.size() - 2] = pad;
        h = at::cat({h, at::zeros(shape, h.options())}, -2);
    }
    std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end() - 2);
    shape.push_back(n_tiles);
    shape.push_back(kTileRows);
    shape.push_back(t.size(-1));
    const int64_t d = (int64_t)shape.size();
    return h.reshape(shape).transpose(d - 2, d - 1).contiguous();
}

}  // namespace quept
