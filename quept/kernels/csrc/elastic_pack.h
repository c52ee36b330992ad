// Load-time repacking of one elastic linear into the kernels' layout (elastic_common.h).
#pragma once

#include <ATen/ATen.h>

namespace quept {

// codes uint8 [N, K] -> planes uint8 [8][n_tiles][n_chunks][64], in the arena.
at::Tensor pack_planes(const at::Tensor& codes, int64_t n_tiles);
// [..., N, X] -> [..., n_tiles, X, 16] in fp16, zero-padded rows.
at::Tensor tile_rows(const at::Tensor& t, int64_t n_tiles);

}  // namespace quept
