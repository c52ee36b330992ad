// Memory for packed layers: large zeroed chunks backed by transparent huge pages where the OS allows.
// Decode streams through about all weights once per token; with 4 KiB pages every layer's every
// stream would cost TLB misses. A chunk is unmapped when the last tensor inside it is freed.
#pragma once

#include <ATen/ATen.h>

namespace quept {

// A zeroed tensor in the arena (falls back to at::zeros when the OS gives no memory map).
at::Tensor arena_empty(c10::IntArrayRef sizes, at::ScalarType dtype);
// A copy of src in the arena.
at::Tensor arena_copy(const at::Tensor& src);

}  // namespace quept
