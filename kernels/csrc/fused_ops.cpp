// Fused elementwise ops of a decoder layer for the native CPU path. At decode (one or a few rows)
// each torch op costs a few microseconds of dispatch for a few hundred flops; these replace the
// dozen small ops around every pair of linears (residual add + RMSNorm, rotary embedding of q and k,
// SiLU(gate) * up) with one call each. Plain fp32 loops, same formulas as quept_runtime/model.py.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace quept {

// h += delta (when delta is defined), then out = h * rsqrt(mean(h^2) + eps) * weight.  h, delta, out: [T, D].
at::Tensor add_rms_norm(at::Tensor h, const std::optional<at::Tensor>& delta, const at::Tensor& weight,
                           double eps) {
    TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(), "h must be contiguous fp32 [T, D]");
    const int64_t T = h.size(0), D = h.size(1);
    TORCH_CHECK(weight.numel() == D && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
                "weight must be contiguous fp32 [D]");
    const float* dp = nullptr;
    at::Tensor dc;
    if (delta.has_value() && delta->defined()) {
        TORCH_CHECK(delta->sizes() == h.sizes() && delta->scalar_type() == at::kFloat, "delta must be fp32 like h");
        dc = delta->contiguous();
        dp = dc.data_ptr<float>();
    }
    auto out = at::empty_like(h);
    float* hp = h.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
        float* hr = hp + t * D;
        float ss = 0.f;
        if (dp) {
            const float* dr = dp + t * D;
            for (int64_t i = 0; i < D; ++i) {
                hr[i] += dr[i];
                ss += hr[i] * hr[i];
            }
        } else {
            for (int64_t i = 0; i < D; ++i) ss += hr[i] * hr[i];
        }
        const float r = 1.f / std::sqrt(ss / (float)D + (float)eps);
        float* orow = op + t * D;
        for (int64_t i = 0; i < D; ++i) orow[i] = hr[i] * r * wp[i];
    }
    return out;
}

// Rotary embedding in place, rotate-half convention: x [T, H, Dh], cos/sin [T, Dh] (the halves repeated).
void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
    TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [T, H, Dh]");
    const int64_t T = x.size(0), H = x.size(1), Dh = x.size(2), half = Dh / 2;
    TORCH_CHECK(Dh % 2 == 0, "head dim must be even");
    TORCH_CHECK(cos.sizes() == sin.sizes() && cos.numel() == T * Dh && cos.scalar_type() == at::kFloat &&
                    cos.is_contiguous() && sin.is_contiguous(),
                "cos and sin must be contiguous fp32 with T * Dh entries");
    float* xp = x.data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
        const float* c = cp + t * Dh;
        const float* s = sp + t * Dh;
        for (int64_t h = 0; h < H; ++h) {
            float* v = xp + (t * H + h) * Dh;
            for (int64_t i = 0; i < half; ++i) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

// silu(g) * u: g, u [T, F] -> [T, F].
at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u) {
    TORCH_CHECK(g.sizes() == u.sizes() && g.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat,
                "gate and up must be fp32 tensors of one shape");
    auto gc = g.contiguous(), uc = u.contiguous();
    auto out = at::empty_like(gc);
    const float* gp = gc.data_ptr<float>();
    const float* up = uc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t n = gc.numel();
    for (int64_t i = 0; i < n; ++i) op[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
    return out;
}

}  // namespace quept

namespace quept {

// Attention of one decoding query over its cached keys, read in place through the slot list (no
// gathered copy): q [Hq, Dh]; k_flat, v_flat [slots, Hkv, Dh]; slots int64 [L]. Query head h reads
// KV head h / (Hq / Hkv) (grouped-query attention, as Hugging Face's repeat_kv). Returns [Hq, Dh].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_flat, const at::Tensor& v_flat,
                            const at::Tensor& slots, double scale) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous fp32 [Hq, Dh]");
    TORCH_CHECK(k_flat.dim() == 3 && k_flat.sizes() == v_flat.sizes() && k_flat.scalar_type() == at::kFloat &&
                    v_flat.scalar_type() == at::kFloat && k_flat.is_contiguous() && v_flat.is_contiguous(),
                "k_flat and v_flat must be contiguous fp32 [slots, Hkv, Dh] of one shape");
    TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() > 0,
                "slots must be a non-empty contiguous int64 [L]");
    const int64_t Hq = q.size(0), Dh = q.size(1), Hkv = k_flat.size(1), L = slots.numel(), S = k_flat.size(0);
    TORCH_CHECK(k_flat.size(2) == Dh && Hkv > 0 && Hq % Hkv == 0, "head sizes do not match: q ", q.sizes(), ", k ",
                k_flat.sizes());
    const int64_t G = Hq / Hkv;
    const int64_t* sl = slots.data_ptr<int64_t>();
    for (int64_t l = 0; l < L; ++l) TORCH_CHECK(sl[l] >= 0 && sl[l] < S, "slot ", sl[l], " outside the cache (", S, ")");
    auto out = at::zeros({Hq, Dh}, q.options());
    std::vector<float> p((size_t)L);
    const float* qp = q.data_ptr<float>();
    const float* kp = k_flat.data_ptr<float>();
    const float* vp = v_flat.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t h = 0; h < Hq; ++h) {
        const int64_t j = h / G;
        const float* qh = qp + h * Dh;
        float mx = -INFINITY;
        for (int64_t l = 0; l < L; ++l) {
            const float* kr = kp + (sl[l] * Hkv + j) * Dh;
            float s = 0.f;
            for (int64_t d = 0; d < Dh; ++d) s += qh[d] * kr[d];
            p[l] = s * (float)scale;
            mx = p[l] > mx ? p[l] : mx;
        }
        float sum = 0.f;
        for (int64_t l = 0; l < L; ++l) {
            p[l] = std::exp(p[l] - mx);
            sum += p[l];
        }
        float* oh = op + h * Dh;
        for (int64_t l = 0; l < L; ++l) {
            const float w = p[l] / sum;
            const float* vr = vp + (sl[l] * Hkv + j) * Dh;
            for (int64_t d = 0; d < Dh; ++d) oh[d] += w * vr[d];
        }
    }
    return out;
}

}  // namespace quept
