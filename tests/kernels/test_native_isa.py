"""The ISA table of the native kernels (kernels/csrc/isa.h): what it lists, how it switches, and that
every call site takes its kernels from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quept.kernels import native

pytestmark = pytest.mark.skipif(native.find_compiler() is None, reason="no C++ compiler: the native kernels cannot be built")


@pytest.fixture
def module():
    m = native.load_native()
    best = m.current_isa()
    yield m
    m.set_isa(best)


def test_table_lists_paths_slowest_first(module) -> None:
    names, available = module.isa_names(), module.available_isas()
    assert names[0] == "generic" and len(set(names)) == len(names)
    assert available[0] == "generic" and set(available) <= set(names)
    assert [n for n in names if n in available] == available, "available paths keep the table's order"
    assert module.current_isa() == available[-1], "the default is the fastest path this CPU runs"


def test_switching_paths(module) -> None:
    for name in module.available_isas():
        native.set_isa(name)
        assert native.current_isa() == name
    for name in set(module.isa_names()) - set(module.available_isas()):
        with pytest.raises(RuntimeError, match=f"ISA '{name}' is not supported by this CPU"):
            module.set_isa(name)
    with pytest.raises(RuntimeError, match="unknown ISA 'sse9'; choose one of generic"):
        module.set_isa("sse9")
    with pytest.raises(ValueError, match=r"unknown ISA 'sse9'; choose one of \['generic'"):
        native.set_isa("sse9")


def test_per_isa_kernels_are_named_only_in_the_table() -> None:
    """Call sites go through active_isa(): outside the table and the headers that declare them, a
    per-ISA function is only defined (or, in an ISA file, called as that file's fallback)."""
    per_isa = re.compile(r"\b(tiles|rows|residual|attend|silu_mul)_(generic|avx2|avx512)\b")
    definition = re.compile(r"^void ((tiles|rows|residual|attend|silu_mul)_\w+)\(", re.M)
    fallbacks = {"attend_generic", "attend_avx2"}  # attend_avx2 / attend_avx512 hand odd head sizes down
    for path in sorted(native.CSRC.iterdir()):
        if path.name in {"isa.cpp", "elastic_common.h", "fused_ops.h"}:
            continue
        text = re.sub(r"//[^\n]*", "", path.read_text())  # code only
        defined = {m.group(1) for m in definition.finditer(text)}
        used = {m.group(0) for m in per_isa.finditer(text)} - defined
        if re.search(r"_(avx2|avx512)\.cpp$", path.name):
            used -= fallbacks
        assert not used, f"{path.name} names {sorted(used)} instead of taking them from active_isa()"


def test_every_source_is_built() -> None:
    files = {p.name for p in Path(native.CSRC).iterdir()}
    assert set(native.SOURCES) == {f for f in files if f.endswith(".cpp")}
    assert set(native.HEADERS) == {f for f in files if f.endswith(".h")}
