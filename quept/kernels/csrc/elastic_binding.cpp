// Python binding of the native elastic linear: load-time repacking into bit-planes, run-time ISA
// dispatch (AVX-512 VNNI, AVX2/FMA/F16C, portable C++), threading with at::parallel_for.
//
//   y[m] = x[m] . deq_b(W)^T + (x[m] . A[:r_b]^T) . B[:, :r_b]^T + bias,   b = row_bits[m]
//
// One Python call per linear: `Layer.forward(x, bits)` for one width, `Layer.forward_segments(x, segs)`
// for rows grouped by width. A `Segments` (row permutation + per-width bounds) is built once per step
// from the plans and shared by every linear that reads it, so no linear sorts its rows. The only
// tensor allocated per call is the output (scratch lives in thread-local buffers).
#include <ATen/Parallel.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused_ops.h"
#include "elastic_common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace quept {
namespace {

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

int detect_isa() {
#if defined(QUEPT_X86)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vnni");
    if (avx512) return kAvx512;
    if (avx2) return kAvx2;
#endif
    return kGeneric;
}

const int g_best_isa = detect_isa();
std::atomic<int> g_isa{g_best_isa};

std::vector<std::string> available_isas() {
    std::vector<std::string> names;
    for (int i = 0; i <= g_best_isa; ++i) names.emplace_back(kIsaNames[i]);
    return names;
}

void set_isa(const std::string& name) {
    for (int i = 0; i <= kAvx512; ++i) {
        if (name == kIsaNames[i]) {
            TORCH_CHECK(i <= g_best_isa, "ISA '", name, "' is not supported by this CPU; available: ",
                        c10::Join(", ", available_isas()));
            g_isa.store(i);
            return;
        }
    }
    TORCH_CHECK(false, "unknown ISA '", name, "'; choose one of generic, avx2, avx512");
}

std::string current_isa() { return kIsaNames[g_isa.load()]; }

}  // namespace

int isa_level() { return g_isa.load(std::memory_order_relaxed); }

namespace {

// Width-8 rows carry two-term activations (elastic_common.h) unless switched off.
std::atomic<bool> g_w8_refine{true};
void set_w8_refine(bool on) { g_w8_refine.store(on); }
bool w8_refine() { return g_w8_refine.load(); }

// 64-byte aligned view into a growing thread-local buffer.
uint8_t* thread_buffer(std::vector<uint8_t>& buf, size_t bytes) {
    if (buf.size() < bytes + 64) buf.resize(bytes + 64);
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<uint8_t*>((p + 63) & ~uintptr_t(63));
}

// Packed layers live in large zeroed chunks backed by transparent huge pages where the OS allows:
// decode streams through ~all weights once per token, and with 4 KiB pages every layer's every
// stream would cost TLB misses. A chunk is unmapped when the last tensor inside it is freed.
class Arena {
   public:
    torch::Tensor empty(c10::IntArrayRef sizes, torch::ScalarType dtype) {
        int64_t numel = 1;
        for (int64_t s : sizes) numel *= s;
        const size_t bytes = ((size_t)numel * c10::elementSize(dtype) + 63) & ~size_t(63);
        std::shared_ptr<Chunk> chunk;
        uint8_t* ptr = nullptr;
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (!cur_ || used_ + bytes > cur_->size) {
                auto fresh = std::make_shared<Chunk>(std::max(kChunkBytes, (bytes + kHuge - 1) & ~(kHuge - 1)));
                if (!fresh->base) return torch::zeros(sizes, torch::dtype(dtype));
                if (bytes >= kChunkBytes / 2 && cur_) {  // big tensor: own chunk, keep filling the current one
                    return wrap(fresh, fresh->base, sizes, dtype);
                }
                cur_ = fresh;
                used_ = 0;
            }
            chunk = cur_;
            ptr = cur_->base + used_;
            used_ += bytes;
        }
        return wrap(chunk, ptr, sizes, dtype);
    }

   private:
    static constexpr size_t kHuge = size_t(2) << 20;
    static constexpr size_t kChunkBytes = size_t(32) << 20;

    struct Chunk {
        uint8_t* base = nullptr;
        size_t size = 0;
        explicit Chunk(size_t n) : size(n) {
#if defined(__linux__)
            void* p = mmap(nullptr, n + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) return;
            map_ = p;
            base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1));
            madvise(base, n, MADV_HUGEPAGE);  // best effort (THP "madvise" or "always")
#endif
        }
        ~Chunk() {
#if defined(__linux__)
            if (map_) munmap(map_, size + kHuge);
#endif
        }
        Chunk(const Chunk&) = delete;
        Chunk& operator=(const Chunk&) = delete;

       private:
        void* map_ = nullptr;
    };

    static torch::Tensor wrap(const std::shared_ptr<Chunk>& chunk, uint8_t* ptr, c10::IntArrayRef sizes,
                              torch::ScalarType dtype) {
        std::shared_ptr<Chunk> keep = chunk;  // freed with the last tensor in the chunk
        return torch::from_blob(ptr, sizes, [keep](void*) mutable { keep.reset(); }, torch::dtype(dtype));
    }

    std::mutex mu_;
    std::shared_ptr<Chunk> cur_;
    size_t used_ = 0;
};

Arena& arena() {
    static Arena* a = new Arena();  // never destroyed: tensors may outlive static destruction
    return *a;
}

torch::Tensor arena_copy(const torch::Tensor& src) {
    auto dst = arena().empty(src.sizes(), src.scalar_type());
    dst.copy_(src);
    return dst;
}

// codes uint8 [N, K] -> planes uint8 [8][n_tiles][n_chunks][64] (layout in elastic_common.h).
torch::Tensor pack_planes(const torch::Tensor& codes, int64_t n_tiles) {
    const int64_t N = codes.size(0), K = codes.size(1), n_chunks = K / kChunk;
    auto planes = arena().empty({8, n_tiles, n_chunks, kBlockBytes}, torch::kUInt8);  // zeroed
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

// [..., N, X] -> [..., n_tiles, X, 16] in fp16, zero-padded rows.
torch::Tensor tile_rows(const torch::Tensor& t, int64_t n_tiles) {
    const int64_t N = t.size(-2), pad = n_tiles * kTileRows - N;
    auto h = t.to(torch::kHalf);
    if (pad) {
        std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
        shape[shape.size() - 2] = pad;
        h = torch::cat({h, torch::zeros(shape, h.options())}, -2);
    }
    std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end() - 2);
    shape.push_back(n_tiles);
    shape.push_back(kTileRows);
    shape.push_back(t.size(-1));
    const int64_t d = (int64_t)shape.size();
    return h.reshape(shape).transpose(d - 2, d - 1).contiguous();
}

// Rows grouped by width: rows order[bounds[i] .. bounds[i+1]) run at bits[i]. Built once per step.
class Segments {
   public:
    Segments(const torch::Tensor& order, std::vector<int64_t> bits, std::vector<int64_t> bounds)
        : bits_(std::move(bits)), bounds_(std::move(bounds)) {
        TORCH_CHECK(order.dim() == 1 && order.scalar_type() == torch::kInt, "order must be int32 [M]");
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
    int64_t num_rows() const { return (int64_t)order_.size(); }

    std::vector<int32_t> order_;
    std::vector<int64_t> bits_, bounds_;
};

class Layer {
   public:
    Layer(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& mins,
          const torch::Tensor& lora_a, const torch::Tensor& lora_b, const torch::Tensor& bias,
          std::vector<int64_t> widths, std::vector<int64_t> ranks, int64_t group_size)
        : widths_(std::move(widths)), ranks_(std::move(ranks)) {
        TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8, "codes must be uint8 [N, K]");
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
            lora_a_ = arena_copy(lora_a.to(torch::kHalf));
            lora_b_ = arena_copy(tile_rows(lora_b, n_tiles));  // [n_tiles, R, 16]
        } else {
            lora_a_ = arena().empty({1, K}, torch::kHalf);
            lora_b_ = arena().empty({n_tiles, 1, kTileRows}, torch::kHalf);
        }
        if (bias.numel() > 0) {
            TORCH_CHECK(bias.numel() == N, "bias must have N=", N, " entries");
            bias_ = arena().empty({n_tiles * kTileRows}, torch::kFloat);  // zeroed
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

    torch::Tensor forward(const torch::Tensor& x, int64_t bits, const std::optional<torch::Tensor>& out) const {
        return run(x, bits, nullptr, out);
    }

    torch::Tensor forward_segments(const torch::Tensor& x, const Segments& segs,
                                   const std::optional<torch::Tensor>& out) const {
        TORCH_CHECK(segs.num_rows() == x.size(0), "segments cover ", segs.num_rows(), " rows; x has ", x.size(0));
        return run(x, 0, &segs, out);
    }

    int64_t resident_bytes() const {
        int64_t total = 0;
        for (const auto* t : {&planes_, &scales_, &mins_, &lora_a_, &lora_b_, &bias_}) {
            if (t->defined()) total += t->numel() * t->element_size();
        }
        return total;
    }

    torch::Tensor planes() const { return planes_; }

   private:
    int width_index(int64_t bits) const {
        for (size_t i = 0; i < widths_.size(); ++i) {
            if (widths_[i] == bits) return (int)i;
        }
        TORCH_CHECK(false, "width ", bits, " is not stored; stored widths are ", c10::Join(", ", widths_));
        return -1;
    }

    torch::Tensor run(const torch::Tensor& x_in, int64_t bits, const Segments* by_width,
                      const std::optional<torch::Tensor>& out_arg) const {
        TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == L_.k, "x must be [M, K] with K=", L_.k, ", got ", x_in.sizes());
        const auto x = x_in.scalar_type() == torch::kFloat ? x_in.contiguous() : x_in.to(torch::kFloat).contiguous();
        const int64_t M = x.size(0), K = L_.k;
        torch::Tensor out;
        if (out_arg.has_value()) {
            out = *out_arg;
            TORCH_CHECK(out.scalar_type() == torch::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == M &&
                            out.size(1) == L_.n,
                        "out must be a contiguous float32 [", M, ", ", L_.n, "] tensor");
        } else {
            out = torch::empty({M, L_.n}, x.options());
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

        const int isa = g_isa.load(std::memory_order_relaxed);
        RowsFn rows_fn = rows_generic;
        ResidualFn residual_fn = residual_generic;
        TilesFn tiles_fn = tiles_generic;
#if defined(QUEPT_X86)
        if (isa >= kAvx2) rows_fn = rows_avx2;
        if (isa >= kAvx2) residual_fn = residual_avx2;
        if (isa == kAvx2) tiles_fn = tiles_avx2;
        if (isa == kAvx512) tiles_fn = tiles_avx512;
#endif
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
        return x_in.scalar_type() == torch::kFloat || out_arg.has_value() ? out : out.to(x_in.scalar_type());
    }

    std::vector<int64_t> widths_, ranks_;
    torch::Tensor planes_, scales_, mins_, lora_a_, lora_b_, bias_;
    LayerView L_{};
};

// The activation quantization of one call on the current ISA path, for tests against
// kernels/native_ref.py: x [M, K] fp32 -> (xq, dx, xqsum, xq2, dx2, xqsum2): int8 [M, K], fp32 [M, K/32]
// and the int32 chunk sums [M, K/32] the dot products start from; the residual term (xq2, dx2, xqsum2)
// is what refined (width-8) rows carry.
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x_in) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat && x_in.size(1) % kChunk == 0,
                "x must be float32 [M, K] with K a multiple of 32, got ", x_in.scalar_type(), " ", x_in.sizes());
    const auto x = x_in.contiguous();
    const int64_t M = x.size(0), K = x.size(1);
    LayerView L{};
    L.k = K;
    L.n_chunks = L.n_groups = K / kChunk;
    L.group_size = kChunk;
    L.rank_max = 1;
    auto xq = torch::empty({M, K}, torch::kInt8), xq2 = torch::empty({M, K}, torch::kInt8);
    auto dx = torch::empty({M, L.n_chunks}, torch::kFloat), dx2 = torch::empty({M, L.n_chunks}, torch::kFloat);
    auto qs = torch::empty({M, L.n_chunks}, torch::kInt32), qs2 = torch::empty({M, L.n_chunks}, torch::kInt32);
    auto xsum = torch::empty({M, L.n_groups}, torch::kFloat), u = torch::empty({M, 1}, torch::kFloat);
    std::vector<int32_t> row_rank((size_t)M, 0);
    RowsFn rows_fn = rows_generic;
    ResidualFn residual_fn = residual_generic;
#if defined(QUEPT_X86)
    if (g_isa.load() >= kAvx2) {
        rows_fn = rows_avx2;
        residual_fn = residual_avx2;
    }
#endif
    rows_fn(x.data_ptr<float>(), 0, M, L, row_rank.data(), xq.data_ptr<int8_t>(), dx.data_ptr<float>(),
            qs.data_ptr<int32_t>(), xsum.data_ptr<float>(), u.data_ptr<float>());
    residual_fn(x.data_ptr<float>(), 0, M, L, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), xq2.data_ptr<int8_t>(),
                dx2.data_ptr<float>(), qs2.data_ptr<int32_t>());
    return {xq, dx, qs, xq2, dx2, qs2};
}

}  // namespace
}  // namespace quept

namespace quept {
// fused_ops.cpp
at::Tensor add_rms_norm(at::Tensor h, const std::optional<at::Tensor>& delta, const at::Tensor& weight, double eps);
void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_flat, const at::Tensor& v_flat,
                           const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& ends, double scale);
void write_kv(at::Tensor k_flat, at::Tensor v_flat, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v);
}  // namespace quept

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    namespace py = pybind11;
    using quept::Layer;
    m.doc() = "quept native CPU kernels for the elastic linear";
    py::class_<Layer>(m, "Layer")
        .def(py::init<const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                      const torch::Tensor&, const torch::Tensor&, std::vector<int64_t>, std::vector<int64_t>, int64_t>(),
             py::arg("codes"), py::arg("scales"), py::arg("mins"), py::arg("lora_a"), py::arg("lora_b"), py::arg("bias"),
             py::arg("widths"), py::arg("ranks"), py::arg("group_size"))
        .def("forward", &Layer::forward, py::arg("x"), py::arg("bits"), py::arg("out") = py::none(),
             py::call_guard<py::gil_scoped_release>())
        .def("forward_segments", &Layer::forward_segments, py::arg("x"), py::arg("segments"), py::arg("out") = py::none(),
             py::call_guard<py::gil_scoped_release>())
        .def("resident_bytes", &Layer::resident_bytes)
        .def("planes", &Layer::planes);
    py::class_<quept::Segments>(m, "Segments")
        .def(py::init<const torch::Tensor&, std::vector<int64_t>, std::vector<int64_t>>(), py::arg("order"),
             py::arg("bits"), py::arg("bounds"), "rows order[bounds[i]:bounds[i+1]] run at bits[i] (order: int32 [M])")
        .def_property_readonly("num_rows", &quept::Segments::num_rows);
    m.def("available_isas", &quept::available_isas, "ISA paths this CPU can run, slowest first");
    m.def("set_isa", &quept::set_isa, py::arg("name"), "Select the ISA path (generic, avx2, avx512)");
    m.def("current_isa", &quept::current_isa);
    m.def("set_w8_refine", &quept::set_w8_refine, py::arg("on"),
          "Width-8 rows take two-term (about 15-bit) activations (default on); off: one int8 term like every width");
    m.def("w8_refine", &quept::w8_refine);
    m.def("quantize_activations", &quept::quantize_activations, py::arg("x"),
          "(xq, dx, xqsum, xq2, dx2, xqsum2): the int8 activations, their chunk sums and the residual term, "
          "as this ISA path computes them");
    m.def("add_rms_norm", &quept::add_rms_norm, py::arg("h"), py::arg("delta"), py::arg("weight"), py::arg("eps"),
          "h += delta (in place, when given); returns rms_norm(h) * weight");
    m.def("rope_", &quept::rope_, py::arg("x"), py::arg("cos"), py::arg("sin"), "rotary embedding in place (rotate-half)");
    m.def("silu_mul", &quept::silu_mul, py::arg("gate"), py::arg("up"));
    m.def("paged_attention", &quept::paged_attention, py::arg("q"), py::arg("k_flat"), py::arg("v_flat"),
          py::arg("slots"), py::arg("starts"), py::arg("ends"), py::arg("scale"),
          "query rows over the paged cache, row r over the cache rows slots[starts[r]:ends[r]], read in place",
          py::call_guard<py::gil_scoped_release>());
    m.def("write_kv", &quept::write_kv, py::arg("k_flat"), py::arg("v_flat"), py::arg("slots"), py::arg("k"),
          py::arg("v"), "K/V rows into the cache slots, converted to the cache's type");
}
