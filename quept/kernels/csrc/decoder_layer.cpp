// One decoder layer in one call (decoder_layer.h).
#include "decoder_layer.h"

#include "fused_ops_torch.h"

namespace quept {
namespace {

at::Tensor linear(const Layer* layer, const at::Tensor& x, const LinearWidth& w) {
    return w.segments ? layer->forward_segments(x, *w.segments, std::nullopt) : layer->forward(x, w.bits, std::nullopt);
}

}  // namespace

at::Tensor decoder_layer(at::Tensor h, const std::optional<at::Tensor>& delta, const std::vector<const Layer*>& linears,
                         const std::vector<LinearWidth>& widths, const at::Tensor& attn_norm,
                         const at::Tensor& mlp_norm, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_flat,
                         at::Tensor v_flat, const at::Tensor& write_slots, const at::Tensor& slots,
                         const at::Tensor& starts, const at::Tensor& ends, const DecoderLayerShape& shape) {
    TORCH_CHECK(linears.size() == 7 && widths.size() == 7, "a decoder layer has 7 linears (q k v o gate up down) and "
                "one width each; got ", linears.size(), " and ", widths.size());
    for (const Layer* l : linears) TORCH_CHECK(l != nullptr, "a decoder layer's linear is missing");
    TORCH_CHECK(h.dim() == 2, "h must be [T, D]");
    const int64_t T = h.size(0), Hq = shape.n_heads, Hkv = shape.n_kv_heads, Dh = shape.head_dim;
    enum { kQ, kK, kV, kO, kGate, kUp, kDown };
    auto run = [&](int i, const at::Tensor& x) { return linear(linears[i], x, widths[i]); };
    at::Tensor x = add_rms_norm(h, delta, attn_norm, shape.eps);
    at::Tensor q = run(kQ, x).view({T, Hq, Dh});
    rope_(q, cos, sin);
    at::Tensor k = run(kK, x).view({T, Hkv, Dh});
    rope_(k, cos, sin);
    at::Tensor v = run(kV, x).view({T, Hkv, Dh});
    write_kv(k_flat, v_flat, write_slots, k, v);
    at::Tensor attn = paged_attention(q, k_flat, v_flat, slots, starts, ends, shape.scale);  // [T, Hq, Dh]
    x = add_rms_norm(h, run(kO, attn.view({T, Hq * Dh})), mlp_norm, shape.eps);
    return run(kDown, silu_mul(run(kGate, x), run(kUp, x)));
}

}  // namespace quept
