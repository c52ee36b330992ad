// One elastic linear as the native kernels hold it, and the per-step grouping of rows by width.
//
//   y[m] = x[m] . deq_b(W)^T + (x[m] . A[:r_b]^T) . B[:, :r_b]^T + bias,   b = row_bits[m]
//
// One Python call per linear: `Layer.forward(x, bits)` for one width, `Layer.forward_segments(x, segs)`
// for rows grouped by width. A `Segments` (row permutation + per-width bounds) is built once per step
// from the plans and shared by every linear that reads it, so no linear sorts its rows. The only
// tensor allocated per call is the output (scratch lives in thread-local buffers).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "elastic_common.h"

namespace quept {

// Rows grouped by width: rows order[bounds[i] .. bounds[i+1]) run at bits[i]. Built once per step.
class Segments {
   public:
    Segments(const at::Tensor& order, std::vector<int64_t> bits, std::vector<int64_t> bounds);
    int64_t num_rows() const { return (int64_t)order_.size(); }

    std::vector<int32_t> order_;
    std::vector<int64_t> bits_, bounds_;
};

class Layer {
   public:
    // codes uint8 [N, K]; scales, mins [W, N, K/G]; lora_a [R, K]; lora_b [N, R]; bias [N] or empty.
    Layer(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
          const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& bias,
          std::vector<int64_t> widths, std::vector<int64_t> ranks, int64_t group_size);

    at::Tensor forward(const at::Tensor& x, int64_t bits, const std::optional<at::Tensor>& out) const;
    at::Tensor forward_segments(const at::Tensor& x, const Segments& segs,
                                   const std::optional<at::Tensor>& out) const;
    int64_t resident_bytes() const;
    at::Tensor planes() const { return planes_; }

   private:
    int width_index(int64_t bits) const;
    at::Tensor run(const at::Tensor& x_in, int64_t bits, const Segments* by_width,
                      const std::optional<at::Tensor>& out_arg) const;

    std::vector<int64_t> widths_, ranks_;
    at::Tensor planes_, scales_, mins_, lora_a_, lora_b_, bias_;
    LayerView L_{};
};

// Width-8 rows carry two-term activations (elastic_common.h) unless switched off.
void set_w8_refine(bool on);
bool w8_refine();

// The activation quantization of one call on the current ISA path, for tests against
// kernels/native_ref.py: x [M, K] fp32 -> (xq, dx, xqsum, xq2, dx2, xqsum2): int8 [M, K], fp32 [M, K/32]
// and the int32 chunk sums [M, K/32] the dot products start from; the residual term (xq2, dx2, xqsum2)
// is what refined (width-8) rows carry.
std::vector<at::Tensor> quantize_activations(const at::Tensor& x_in);

}  // namespace quept
