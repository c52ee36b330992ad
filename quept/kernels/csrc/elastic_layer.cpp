// The native elastic linear (elastic_layer.h): load-time packing into the arena, per-call activation
// quantization, and the tile loop over threads, each kernel taken from the ISA table (isa.h).
#include "elastic_layer.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "arena.h"
#include "elastic_pack.h"
#include "isa.h"

namespace quept {
namespace {

std::atomic<bool> g_w8_refine{true};

// 64-byte aligned view into a growing thread-local buffer.
uint8_t* thread_buffer(std::vector<uint8_t>& buf, size_t bytes) {
    if (buf.size() < bytes + 64) buf.resize(bytes + 64);
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<uint8_t*>((p + 63) & ~uintptr_t(63));
}

}  // namespace

void set_w8_refine(bool on) { g_w8_refine.store(on); }
bool w8_refine() { return g_w8_refine.load(); }

Segments::Segments(const at::Tensor& order, std::vector<int64_t> bits, std::vector<int64_t> bounds)
    : bits_(std::move(bits)), bounds_(std::move(bounds)) {
    TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kInt, "order must be int32 [M]");
    TORCH_CHECK(bounds_.size() == bits_.size() + 1 && !bits_.empty() && bits_.size() <= 8,
                "one to eight segments with len(bounds) == len(bits) + 1 expected");
    TORCH_CHECK(bounds_.front() == 0 && bounds_.back() == order.size(0), "bounds must run from 0 to M=", order.size(0));
    for (size_t i = 0; i < bits_.size(); ++i) {
        TORCH_CHECK(bounds_[i] <= bounds_[i + 1], "bounds must not decrease");
        TORCH_CHECK(bits_[i] >= 1 && bits_[i] <= 8, "widths must be in 1..8, got ", bits_[i]);
    }
    const auto o = order.contiguous();
    order_.assign(o.data_ptr<int32_t>(), o.data_ptr<int32_t>() + o.numel());
    std::vector<bool> seen(order_.size(), false);
    for (int32_t m : order_) {
        TORCH_CHECK(m >= 0 && m < (int32_t)order_.size() && !seen[m], "order must be a permutation of 0..M-1");
        seen[m] = true;
    }
}

Layer::Layer(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
             const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& bias,
             std::vector<int64_t> widths, std::vector<int64_t> ranks, int64_t group_size)
    : widths_(std::move(widths)), ranks_(std::move(ranks)) {
    TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "codes must be uint8 [N, K]");
    const int64_t N = codes.size(0), K = codes.size(1), W = (int64_t)widths_.size();
    TORCH_CHECK(group_size > 0 && group_size % kChunk == 0, "group size must be a multiple of 32, got ", group_size);
    TORCH_CHECK(K % group_size == 0, "group size ", group_size, " does not divide K=", K);
    TORCH_CHECK((int64_t)ranks_.size() == W, "one rank per width expected");
    TORCH_CHECK(scales.sizes() == mins.sizes() && scales.dim() == 3 && scales.size(0) == W && scales.size(1) == N &&
                    scales.size(2) == K / group_size,
                "scales/mins must be [W, N, K/G] = [", W, ", ", N, ", ", K / group_size, "], got ", scales.sizes());
    const int64_t R = lora_a.dim() == 2 ? lora_a.size(0) : 0;
    TORCH_CHECK(R == 0 || (lora_a.size(1) == K && lora_b.dim() == 2 && lora_b.size(0) == N && lora_b.size(1) == R),
                "lora_a must be [R, K] and lora_b [N, R]");
    for (int64_t i = 0; i < W; ++i) {
        TORCH_CHECK(widths_[i] >= 1 && widths_[i] <= 8, "widths must be in 1..8, got ", widths_[i]);
        TORCH_CHECK(ranks_[i] >= 0 && ranks_[i] <= R, "rank ", ranks_[i], " of width ", widths_[i],
                    " exceeds the adapter rank ", R);
    }
    const int64_t n_tiles = (N + kTileRows - 1) / kTileRows;
    auto c = codes.contiguous();
    planes_ = pack_planes(c, n_tiles);
    scales_ = arena_copy(tile_rows(scales, n_tiles));  // [W, n_tiles, K/G, 16]
    mins_ = arena_copy(tile_rows(mins, n_tiles));
    if (R > 0) {
        lora_a_ = arena_copy(lora_a.to(at::kHalf));
        lora_b_ = arena_copy(tile_rows(lora_b, n_tiles));  // [n_tiles, R, 16]
    } else {
        lora_a_ = arena_empty({1, K}, at::kHalf);
        lora_b_ = arena_empty({n_tiles, 1, kTileRows}, at::kHalf);
    }
    if (bias.numel() > 0) {
        TORCH_CHECK(bias.numel() == N, "bias must have N=", N, " entries");
        bias_ = arena_empty({n_tiles * kTileRows}, at::kFloat);  // zeroed
        bias_.narrow(0, 0, N).copy_(bias.reshape({N}));
    }
    L_.planes = planes_.data_ptr<uint8_t>();
    L_.scales = reinterpret_cast<const uint16_t*>(scales_.data_ptr<at::Half>());
    L_.mins = reinterpret_cast<const uint16_t*>(mins_.data_ptr<at::Half>());
    L_.lora_a = reinterpret_cast<const uint16_t*>(lora_a_.data_ptr<at::Half>());
    L_.lora_b = reinterpret_cast<const uint16_t*>(lora_b_.data_ptr<at::Half>());
    L_.bias = bias_.defined() ? bias_.data_ptr<float>() : nullptr;
    L_.n = N;
    L_.k = K;
    L_.n_tiles = n_tiles;
    L_.n_chunks = K / kChunk;
    L_.group_size = group_size;
    L_.n_groups = K / group_size;
    L_.rank_max = std::max<int64_t>(R, 1);
    L_.plane_stride = n_tiles * L_.n_chunks * kBlockBytes;
    L_.width_stride = n_tiles * L_.n_groups * kTileRows;
}

at::Tensor Layer::forward(const at::Tensor& x, int64_t bits, const std::optional<at::Tensor>& out) const {
    return run(x, bits, nullptr, out);
}

at::Tensor Layer::forward_segments(const at::Tensor& x, const Segments& segs,
                                      const std::optional<at::Tensor>& out) const {
    TORCH_CHECK(segs.num_rows() == x.size(0), "segments cover ", segs.num_rows(), " rows; x has ", x.size(0));
    return run(x, 0, &segs, out);
}

int64_t Layer::resident_bytes() const {
    int64_t total = 0;
    for (const auto* t : {&planes_, &scales_, &mins_, &lora_a_, &lora_b_, &bias_}) {
        if (t->defined()) total += t->numel() * t->element_size();
    }
    return total;
}

int Layer::width_index(int64_t bits) const {
    for (size_t i = 0; i < widths_.size(); ++i) {
        if (widths_[i] == bits) return (int)i;
    }
    TORCH_CHECK(false, "width ", bits, " is not stored; stored widths are ", c10::Join(", ", widths_));
    return -1;
}

at::Tensor Layer::run(const at::Tensor& x_in, int64_t bits, const Segments* by_width,
                         const std::optional<at::Tensor>& out_arg) const {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == L_.k, "x must be [M, K] with K=", L_.k, ", got ", x_in.sizes());
    const auto x = x_in.scalar_type() == at::kFloat ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
    const int64_t M = x.size(0), K = L_.k;
    at::Tensor out;
    if (out_arg.has_value()) {
        out = *out_arg;
        TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == M &&
                        out.size(1) == L_.n,
                    "out must be a contiguous float32 [", M, ", ", L_.n, "] tensor");
    } else {
        out = at::empty({M, L_.n}, x.options());
    }
    if (M == 0 || L_.n == 0) return out;

    // per-call buffers (caller's thread): rows, row ranks, quantized activations
    thread_local std::vector<uint8_t> call_buf;
    const size_t off_rank = (size_t)M * 4, off_xq = off_rank + (size_t)M * 4;
    const size_t off_dx = (off_xq + (size_t)(M * K) + 63) & ~size_t(63);
    const size_t off_qs = off_dx + (size_t)(M * L_.n_chunks) * 4;
    const size_t off_xs = off_qs + (size_t)(M * L_.n_chunks) * 4;
    const size_t off_u = off_xs + (size_t)(M * L_.n_groups) * 4;
    // residual activations of refined rows (sized for every row; filled only when some row refines)
    const size_t off_xq2 = (off_u + (size_t)(M * L_.rank_max) * 4 + 63) & ~size_t(63);
    const size_t off_dx2 = (off_xq2 + (size_t)(M * K) + 63) & ~size_t(63);
    const size_t off_qs2 = off_dx2 + (size_t)(M * L_.n_chunks) * 4;
    uint8_t* buf = thread_buffer(call_buf, off_qs2 + (size_t)(M * L_.n_chunks) * 4);
    int32_t* rows = reinterpret_cast<int32_t*>(buf);
    int32_t* row_rank = reinterpret_cast<int32_t*>(buf + off_rank);
    int8_t* xq = reinterpret_cast<int8_t*>(buf + off_xq);
    float* dx = reinterpret_cast<float*>(buf + off_dx);
    int32_t* xqsum = reinterpret_cast<int32_t*>(buf + off_qs);
    float* xsum = reinterpret_cast<float*>(buf + off_xs);
    float* u = reinterpret_cast<float*>(buf + off_u);
    int8_t* xq2 = reinterpret_cast<int8_t*>(buf + off_xq2);
    float* dx2 = reinterpret_cast<float*>(buf + off_dx2);
    int32_t* xqsum2 = reinterpret_cast<int32_t*>(buf + off_qs2);

    Segment segs[8];
    int n_segs = 0;
    if (by_width == nullptr) {
        const int w = width_index(bits);
        for (int64_t m = 0; m < M; ++m) {
            rows[m] = (int32_t)m;
            row_rank[m] = (int32_t)ranks_[w];
        }
        segs[n_segs++] = Segment{(int)bits, w, (int)ranks_[w], rows, M};
    } else {  // the step's grouping: rows point into the shared permutation
        for (size_t i = 0; i < by_width->bits_.size(); ++i) {
            const int64_t lo = by_width->bounds_[i], n = by_width->bounds_[i + 1] - lo;
            if (n == 0) continue;
            const int w = width_index(by_width->bits_[i]);
            const int32_t* seg_rows = by_width->order_.data() + lo;
            for (int64_t j = 0; j < n; ++j) row_rank[seg_rows[j]] = (int32_t)ranks_[w];
            segs[n_segs++] = Segment{(int)by_width->bits_[i], w, (int)ranks_[w], seg_rows, n};
        }
    }

    const IsaPath& isa = active_isa();  // one path for the whole call
    const RowsFn rows_fn = isa.rows;
    const ResidualFn residual_fn = isa.residual;
    const TilesFn tiles_fn = isa.tiles;
    // The adapter rows are read first, by one thread: ask for all of them at once.
    int rank_used = 0;
    for (int i = 0; i < n_segs; ++i) rank_used = std::max(rank_used, segs[i].rank);
    const char* a_bytes = reinterpret_cast<const char*>(L_.lora_a);
    for (int64_t off = 0; off < (int64_t)rank_used * K * 2; off += 64) __builtin_prefetch(a_bytes + off, 0, 3);
    const float* xp = x.data_ptr<float>();
    const int64_t row_work = K * (1 + L_.rank_max);
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / row_work), [&](int64_t m0, int64_t m1) {
        rows_fn(xp, m0, m1, L_, row_rank, xq, dx, xqsum, xsum, u);
    });

    const bool refine = g_w8_refine.load(std::memory_order_relaxed);
    bool any_refined = false;
    for (int i = 0; i < n_segs; ++i) {
        segs[i].refine = refine && segs[i].bits == 8;
        if (segs[i].refine) {
            any_refined = true;
            const Segment& sg = segs[i];
            at::parallel_for(0, sg.n_rows, std::max<int64_t>(1, 65536 / K), [&](int64_t i0, int64_t i1) {
                for (int64_t j = i0; j < i1; ++j) {
                    const int64_t m = sg.rows[j];
                    residual_fn(xp, m, m + 1, L_, xq, dx, xq2, dx2, xqsum2);
                }
            });
        }
    }
    ActView A{xq, dx, xqsum, xsum, u, out.data_ptr<float>()};
    if (any_refined) {
        A.xq2 = xq2;
        A.dx2 = dx2;
        A.xqsum2 = xqsum2;
    }
    const int64_t tile_work = kTileRows * K * M;
    const int64_t grain = std::max<int64_t>(1, 65536 / tile_work);
    const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), (L_.n_tiles + grain - 1) / grain);
    // Threads take runs of tiles from a shared counter rather than fixed halves, so that a thread
    // the OS preempts (a shared machine) or that meets slower memory does not hold the others up.
    const int64_t step = std::max<int64_t>(1, L_.n_tiles / (8 * std::max<int64_t>(n_threads, 1)));
    std::atomic<int64_t> next{0};
    auto work = [&](int64_t, int64_t) {
        thread_local std::vector<uint8_t> tile_buf;
        uint8_t* scratch = thread_buffer(tile_buf, (size_t)scratch_bytes(K));
        for (int64_t t0; (t0 = next.fetch_add(step, std::memory_order_relaxed)) < L_.n_tiles;) {
            tiles_fn(L_, A, segs, n_segs, t0, std::min(t0 + step, L_.n_tiles), scratch);
        }
    };
    if (n_threads <= 1) {
        work(0, 1);
    } else {
        at::parallel_for(0, n_threads, 1, work);
    }
    return x_in.scalar_type() == at::kFloat || out_arg.has_value() ? out : out.to(x_in.scalar_type());
}

std::vector<at::Tensor> quantize_activations(const at::Tensor& x_in) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) % kChunk == 0,
                "x must be float32 [M, K] with K a multiple of 32, got ", x_in.scalar_type(), " ", x_in.sizes());
    const auto x = x_in.contiguous();
    const int64_t M = x.size(0), K = x.size(1);
    LayerView L{};
    L.k = K;
    L.n_chunks = L.n_groups = K / kChunk;
    L.group_size = kChunk;
    L.rank_max = 1;
    auto xq = at::empty({M, K}, at::kChar), xq2 = at::empty({M, K}, at::kChar);
    auto dx = at::empty({M, L.n_chunks}, at::kFloat), dx2 = at::empty({M, L.n_chunks}, at::kFloat);
    auto qs = at::empty({M, L.n_chunks}, at::kInt), qs2 = at::empty({M, L.n_chunks}, at::kInt);
    auto xsum = at::empty({M, L.n_groups}, at::kFloat), u = at::empty({M, 1}, at::kFloat);
    std::vector<int32_t> row_rank((size_t)M, 0);
    const IsaPath& isa = active_isa();
    isa.rows(x.data_ptr<float>(), 0, M, L, row_rank.data(), xq.data_ptr<int8_t>(), dx.data_ptr<float>(),
             qs.data_ptr<int32_t>(), xsum.data_ptr<float>(), u.data_ptr<float>());
    isa.residual(x.data_ptr<float>(), 0, M, L, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), xq2.data_ptr<int8_t>(),
                 dx2.data_ptr<float>(), qs2.data_ptr<int32_t>());
    return {xq, dx, qs, xq2, dx2, qs2};
}

}  // namespace quept
