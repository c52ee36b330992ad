// The torch entry points of the fused layer ops (fused_ops.cpp), bound in binding.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace quept {

// h += delta (in place, when given); returns rms_norm(h) * weight.  h, delta: [T, D].
at::Tensor add_rms_norm(at::Tensor h, const std::optional<at::Tensor>& delta, const at::Tensor& weight, double eps);
// Rotary embedding in place (rotate-half).  x: [T, H, Dh]; cos, sin: [T, Dh].
void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin);
// silu(g) * u: g, u [T, F] -> [T, F].
at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u);
// Query rows over the paged cache: row r attends to the cache rows slots[starts[r]:ends[r]], read in place.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_flat, const at::Tensor& v_flat,
                           const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& ends, double scale);
// K/V rows into the cache slots, converted to the cache's type.
void write_kv(at::Tensor k_flat, at::Tensor v_flat, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v);

}  // namespace quept
