// The one table of ISA paths of the native kernels. A row names a path, says whether this CPU can
// run it, and holds every function that differs by instruction set; every call site takes its
// function from active_isa(). Adding an ISA is one file of kernels plus one row in isa.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "elastic_common.h"
#include "fused_ops.h"

namespace quept {

using AttendFn = void (*)(const AttnTask&);
using SiluMulFn = void (*)(const float* g, const float* u, float* out, int64_t n);

struct IsaPath {
    const char* name;
    bool (*supported)();  // can this CPU run it
    TilesFn tiles;        // elastic linear: a run of tiles of one layer, every width segment
    RowsFn rows;          // elastic linear: activation quantization and the adapter down-projection
    ResidualFn residual;  // elastic linear: the residual activation term of refined rows
    AttendFn attend;      // decode attention of one (query row, KV head) task, any head size
    SiluMulFn silu_mul;   // silu(g) * u
};

const IsaPath& active_isa();                // the path every kernel call takes now
std::vector<std::string> isa_names();       // every row of the table, slowest first
std::vector<std::string> available_isas();  // the rows this CPU supports, slowest first
void set_isa(const std::string& name);      // raises on an unknown or unsupported name
std::string current_isa();

}  // namespace quept
