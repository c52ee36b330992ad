// The ISA table (isa.h): its rows, the CPU checks, and the switch every call site reads.
#include "isa.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <atomic>

namespace quept {
namespace {

bool always() { return true; }

#if defined(QUEPT_X86)
bool has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool has_avx512_vnni() {
    return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
}
#endif

// Slowest first; the last supported row is the default. AVX-512 quantizes activations with the
// AVX2 code (that loop is memory-bound: a wider one measured no faster).
const IsaPath kTable[] = {
    {"generic", always, tiles_generic, rows_generic, residual_generic, attend_generic, silu_mul_generic},
#if defined(QUEPT_X86)
    {"avx2", has_avx2, tiles_avx2, rows_avx2, residual_avx2, attend_avx2, silu_mul_avx2},
    {"avx512", has_avx512_vnni, tiles_avx512, rows_avx2, residual_avx2, attend_avx512, silu_mul_avx512},
#endif
};
constexpr int kRows = sizeof(kTable) / sizeof(kTable[0]);

int best_row() {
    int best = 0;
    for (int i = 0; i < kRows; ++i) {
        if (kTable[i].supported()) best = i;
    }
    return best;
}

std::atomic<const IsaPath*> g_active{&kTable[best_row()]};

}  // namespace

const IsaPath& active_isa() { return *g_active.load(std::memory_order_relaxed); }

std::vector<std::string> isa_names() {
    std::vector<std::string> names;
    for (const auto& row : kTable) names.emplace_back(row.name);
    return names;
}

std::vector<std::string> available_isas() {
    std::vector<std::string> names;
    for (const auto& row : kTable) {
        if (row.supported()) names.emplace_back(row.name);
    }
    return names;
}

void set_isa(const std::string& name) {
    for (const auto& row : kTable) {
        if (name == row.name) {
            TORCH_CHECK(row.supported(), "ISA '", name, "' is not supported by this CPU; available: ",
                        c10::Join(", ", available_isas()));
            g_active.store(&row);
            return;
        }
    }
    TORCH_CHECK(false, "unknown ISA '", name, "'; choose one of ", c10::Join(", ", isa_names()));
}

std::string current_isa() { return active_isa().name; }

}  // namespace quept
