// Fused elementwise ops of a decoder layer for the native CPU path. At decode (one or a few rows)
// each torch op costs a few microseconds of dispatch for a few hundred flops; these replace the
// dozen small ops around every pair of linears (residual add + RMSNorm, rotary embedding of q and k,
// SiLU(gate) * up) with one call each. Plain fp32 loops, same formulas as quept/model/layer_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "fused_ops.h"
#include "fused_ops_torch.h"
#include "isa.h"

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
    active_isa().silu_mul(gc.data_ptr<float>(), uc.data_ptr<float>(), out.data_ptr<float>(), gc.numel());
    return out;
}

}  // namespace quept

namespace quept {

// K/V rows into the cache: k_flat[slots[t]] = k[t], v_flat[slots[t]] = v[t], converted to the cache's
// type (fp32 or fp16). k, v: fp32 [T, Hkv, Dh]; k_flat, v_flat: [slots, Hkv, Dh]. One call for what
// is otherwise two conversions and two index_copy_ per layer.
void write_kv(at::Tensor k_flat, at::Tensor v_flat, const at::Tensor& slots, const at::Tensor& k,
              const at::Tensor& v) {
    TORCH_CHECK(k_flat.dim() == 3 && k_flat.sizes() == v_flat.sizes() && k_flat.scalar_type() == v_flat.scalar_type() &&
                    (k_flat.scalar_type() == at::kFloat || k_flat.scalar_type() == at::kHalf) &&
                    k_flat.is_contiguous() && v_flat.is_contiguous(),
                "k_flat and v_flat must be contiguous fp32 or fp16 [slots, Hkv, Dh] of one shape and type");
    TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.is_contiguous() &&
                    v.is_contiguous() && k.sizes() == v.sizes() && k.dim() == 3 && k.size(1) == k_flat.size(1) &&
                    k.size(2) == k_flat.size(2),
                "k and v must be contiguous fp32 [T, Hkv, Dh] matching the cache, got ", k.sizes());
    TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous() &&
                    slots.numel() == k.size(0),
                "slots must be a contiguous int64 [T] with T=", k.size(0));
    const int64_t T = k.size(0), row = k.size(1) * k.size(2), S = k_flat.size(0);
    const int64_t* sl = slots.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sl[t] >= 0 && sl[t] < S, "slot ", sl[t], " outside the cache (", S, ")");
    const float* kp = k.data_ptr<float>();
    const float* vp = v.data_ptr<float>();
    if (k_flat.scalar_type() == at::kFloat) {
        float* kd = k_flat.data_ptr<float>();
        float* vd = v_flat.data_ptr<float>();
        for (int64_t t = 0; t < T; ++t) {
            std::copy(kp + t * row, kp + (t + 1) * row, kd + sl[t] * row);
            std::copy(vp + t * row, vp + (t + 1) * row, vd + sl[t] * row);
        }
        return;
    }
    at::Half* kd = k_flat.data_ptr<at::Half>();
    at::Half* vd = v_flat.data_ptr<at::Half>();
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < row; ++i) {
            kd[sl[t] * row + i] = static_cast<at::Half>(kp[t * row + i]);
            vd[sl[t] * row + i] = static_cast<at::Half>(vp[t * row + i]);
        }
    }
}

// Attention of R query rows over the paged cache, read in place through slot lists (no gathered
// copy): q [R, Hq, Dh]; k_flat, v_flat [slots, Hkv, Dh] in fp32 or fp16 (the cache's type, one for
// both); row r attends to the cache rows slots[starts[r] : ends[r]] (int64). A decoding sequence is
// one row over its whole context; the rows of a prefill chunk share a start and end one slot apart
// (causal). Query head h reads KV head h / (Hq / Hkv) (grouped-query attention, as Hugging Face's
// repeat_kv). Returns [R, Hq, Dh]. Work is split over (row, KV head) pairs on torch's intra-op
// threads; the G query heads of a KV head share each key read (fused_ops.h; the kernels of each ISA
// in fused_generic.cpp, fused_avx2.cpp and fused_avx512.cpp).
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_flat, const at::Tensor& v_flat,
                           const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& ends, double scale) {
    TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
                "q must be contiguous fp32 [R, Hq, Dh]");
    TORCH_CHECK(k_flat.dim() == 3 && k_flat.sizes() == v_flat.sizes() && k_flat.scalar_type() == v_flat.scalar_type() &&
                    (k_flat.scalar_type() == at::kFloat || k_flat.scalar_type() == at::kHalf) &&
                    k_flat.is_contiguous() && v_flat.is_contiguous(),
                "k_flat and v_flat must be contiguous fp32 or fp16 [slots, Hkv, Dh] of one shape and type");
    TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
                "slots must be a contiguous int64 [n]");
    const int64_t B = q.size(0), Hq = q.size(1), Dh = q.size(2), Hkv = k_flat.size(1), S = k_flat.size(0);
    for (const auto* t : {&starts, &ends}) {
        TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == B,
                    "starts and ends must be contiguous int64 [R] with R=", B);
    }
    TORCH_CHECK(k_flat.size(2) == Dh && Hkv > 0 && Hq % Hkv == 0, "head sizes do not match: q ", q.sizes(), ", k ",
                k_flat.sizes());
    const int64_t G = Hq / Hkv;
    const int64_t* sl = slots.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    const int64_t* en = ends.data_ptr<int64_t>();
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(0 <= st[b] && st[b] < en[b] && en[b] <= slots.numel(), "row ", b, " spans slots [", st[b], ", ",
                    en[b], ") of ", slots.numel(), ": a span must be non-empty and inside the slot list");
        max_len = std::max(max_len, en[b] - st[b]);
    }
    for (int64_t l = 0; l < slots.numel(); ++l) {
        TORCH_CHECK(sl[l] >= 0 && sl[l] < S, "slot ", sl[l], " outside the cache (", S, ")");
    }
    auto out = at::empty({B, Hq, Dh}, q.options());
    const float* qp = q.data_ptr<float>();
    const bool half = k_flat.scalar_type() == at::kHalf;
    const size_t esize = half ? 2 : 4;
    const char* kp = static_cast<const char*>(k_flat.data_ptr());
    const char* vp = static_cast<const char*>(v_flat.data_ptr());
    float* op = out.data_ptr<float>();
    const AttendFn attend = active_isa().attend;
    const int64_t work_per_task = max_len * G * Dh * 2;
    at::parallel_for(0, B * Hkv, std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1)),
                     [&](int64_t i0, int64_t i1) {
        std::vector<float> scores((size_t)(std::min(kAttnMaxG, G) * max_len));
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / Hkv, j = i % Hkv;
            for (int64_t g0 = 0; g0 < G; g0 += kAttnMaxG) {  // query heads of KV head j, kAttnMaxG at a time
                const int64_t h = j * G + g0;  // first query head of this task
                AttnTask t{qp + (b * Hq + h) * Dh, kp + j * Dh * esize, vp + j * Dh * esize, sl + st[b],
                           en[b] - st[b], std::min(kAttnMaxG, G - g0), Dh, Hkv * Dh, (float)scale,
                           op + (b * Hq + h) * Dh, scores.data(), half};
                attend(t);
            }
        }
    });
    return out;
}

}  // namespace quept
