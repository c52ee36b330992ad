// One decoder layer of a LLaMA-family model on the native CPU path, in one call: the model's
// op-by-op forward (quept/model/model.py) with its Python dispatch between the ops removed. It calls
// the same kernels in the same order (add_rms_norm, the elastic linears, rope_, write_kv,
// paged_attention, silu_mul), so its output is bit-identical to the op-by-op path.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "elastic_layer.h"

namespace quept {

// The width of one linear for this step: every row at `bits`, or the rows grouped by `segments`.
struct LinearWidth {
    int64_t bits = 0;
    const Segments* segments = nullptr;
};

struct DecoderLayerShape {
    int64_t n_heads, n_kv_heads, head_dim;
    double eps;    // RMSNorm epsilon
    double scale;  // attention scale, 1 / sqrt(head_dim) as the caller computes it
};

// h [T, D] fp32, updated in place: h += delta (the previous layer's MLP output, when given), then
// attention (K/V written to the cache slots `write_slots`, row r attending to slots[starts[r]:ends[r]])
// and the residual add; returns this layer's MLP output [T, D], which the next norm adds to h.
// linears: q, k, v, o, gate, up, down; widths: one per linear; cos, sin: [T, 1, Dh].
at::Tensor decoder_layer(at::Tensor h, const std::optional<at::Tensor>& delta, const std::vector<const Layer*>& linears,
                         const std::vector<LinearWidth>& widths, const at::Tensor& attn_norm,
                         const at::Tensor& mlp_norm, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_flat,
                         at::Tensor v_flat, const at::Tensor& write_slots, const at::Tensor& slots,
                         const at::Tensor& starts, const at::Tensor& ends, const DecoderLayerShape& shape);

}  // namespace quept
