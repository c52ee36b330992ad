// The tile loop every path of the native elastic linear shares: tiles [t0, t1) of one layer, each
// segment of rows at its own width, with the adapter columns of the tiles ahead prefetched.
//
// An ISA file defines a kernel type with
//     template <int B> static void segment(const LayerView&, const ActView&, const Segment&, int64_t t,
//                                          uint8_t* scratch);   // one segment's rows against tile t
// and its TilesFn is `run_tiles<ThatKernel>`. SIMD files include this header after their
// `#pragma GCC target` line: the functions live in an anonymous namespace, so each file gets its own
// copy compiled for its instruction set and nothing leaks into other code (as avx2_lanes.h).
#pragma once

#include <cstdint>

#include "elastic_common.h"

namespace quept {
namespace {

// prefetcht0 by hand on x86: GCC 12 drops _mm_prefetch / __builtin_prefetch inside target-pragma code.
inline void prefetch_line(const void* p) {
#if defined(QUEPT_X86)
    __asm__ __volatile__("prefetcht0 (%0)" : : "r"(p));
#else
    __builtin_prefetch(p, 0, 3);
#endif
}

// The adapter columns of a tile (the first `rank` of R rows of 16 halves) are a short strided read
// the hardware prefetchers miss; without this every tile waits on them. The planes, scales and mins
// are long sequential streams that the hardware prefetches well by itself.
inline void prefetch_adapter(const LayerView& L, const Segment& seg, int64_t t) {
    const char* lb = (const char*)(L.lora_b + t * L.rank_max * kTileRows);
    for (int64_t off = 0; off < seg.rank * kTileRows * 2; off += 64) prefetch_line(lb + off);
}

template <class Kernel>
void run_tiles(const LayerView& L, const ActView& A, const Segment* segs, int n_segs, int64_t t0, int64_t t1,
               uint8_t* scratch) {
    constexpr int64_t kAhead = 2;  // tiles of adapter columns in flight
    for (int s = 0; s < n_segs; ++s) {
        for (int64_t t = t0; t < t0 + kAhead && t < t1; ++t) prefetch_adapter(L, segs[s], t);
    }
    for (int64_t t = t0; t < t1; ++t) {
        for (int s = 0; s < n_segs; ++s) {
            const Segment& seg = segs[s];
            if (t + kAhead < t1) prefetch_adapter(L, seg, t + kAhead);
            switch (seg.bits) {  // widths are compile-time in the kernels: one instantiation each
                case 1: Kernel::template segment<1>(L, A, seg, t, scratch); break;
                case 2: Kernel::template segment<2>(L, A, seg, t, scratch); break;
                case 3: Kernel::template segment<3>(L, A, seg, t, scratch); break;
                case 4: Kernel::template segment<4>(L, A, seg, t, scratch); break;
                case 5: Kernel::template segment<5>(L, A, seg, t, scratch); break;
                case 6: Kernel::template segment<6>(L, A, seg, t, scratch); break;
                case 7: Kernel::template segment<7>(L, A, seg, t, scratch); break;
                default: Kernel::template segment<8>(L, A, seg, t, scratch); break;
            }
        }
    }
}

}  // namespace
}  // namespace quept
