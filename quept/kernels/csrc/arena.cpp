// The huge-page arena of packed layers (arena.h).
#include "arena.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace quept {
namespace {

class Arena {
   public:
    at::Tensor empty(c10::IntArrayRef sizes, at::ScalarType dtype) {
        int64_t numel = 1;
        for (int64_t s : sizes) numel *= s;
        const size_t bytes = ((size_t)numel * c10::elementSize(dtype) + 63) & ~size_t(63);
        std::shared_ptr<Chunk> chunk;
        uint8_t* ptr = nullptr;
        {
            std::lock_guard<std::mutex> lock(mu_);
            if (!cur_ || used_ + bytes > cur_->size) {
                auto fresh = std::make_shared<Chunk>(std::max(kChunkBytes, (bytes + kHuge - 1) & ~(kHuge - 1)));
                if (!fresh->base) return at::zeros(sizes, at::dtype(dtype));
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

    static at::Tensor wrap(const std::shared_ptr<Chunk>& chunk, uint8_t* ptr, c10::IntArrayRef sizes,
                              at::ScalarType dtype) {
        std::shared_ptr<Chunk> keep = chunk;  // freed with the last tensor in the chunk
        return at::from_blob(ptr, sizes, [keep](void*) mutable { keep.reset(); }, at::dtype(dtype));
    }

    std::mutex mu_;
    std::shared_ptr<Chunk> cur_;
    size_t used_ = 0;
};

Arena& arena() {
    static Arena* a = new Arena();  // never destroyed: tensors may outlive static destruction
    return *a;
}

}  // namespace

at::Tensor arena_empty(c10::IntArrayRef sizes, at::ScalarType dtype) { return arena().empty(sizes, dtype); }

at::Tensor arena_copy(const at::Tensor& src) {
    auto dst = arena_empty(src.sizes(), src.scalar_type());
    dst.copy_(src);
    return dst;
}

}  // namespace quept

