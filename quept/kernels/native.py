"""Build and load the native CPU kernels (quept/kernels/csrc/) as a PyTorch C++ extension.

The extension is compiled once on first use and cached under `$QUEPT_CACHE_DIR/native/` (default
`~/.cache/quept/native/`); the cache key hashes the sources, the torch version and the Python
version, so an upgrade rebuilds instead of loading a stale binary. It is built without
`-march=native`: every SIMD path is compiled for its own instruction set with target pragmas and
chosen at run time from what the CPU reports (AVX-512 VNNI, AVX2/FMA/F16C, or plain C++), so one
build runs on any x86-64 CPU, and on other CPUs through the plain C++ path.

With `ninja` installed the build goes through `torch.utils.cpp_extension.load`; without it the
compiler is called directly. A cached build loads without a compiler (an image can ship one built
by `python -m quept.kernels.native`). With neither, `load_native` raises `RuntimeError`, which
`quept.backends.get_backend('auto')` turns into a logged fallback to the `torch` backend.

Environment:
    QUEPT_CACHE_DIR     cache root (default ~/.cache/quept)
    QUEPT_NATIVE_ISA    force an ISA path: generic, avx2 or avx512 (default: the best available)
    QUEPT_NATIVE_W8_REFINE  0: width-8 rows take one int8 activation term like every width
                        (default 1: two terms, about 15 bits; see kernels/native_ref.py)
    CXX                 the C++ compiler (default c++)
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
# Every file in csrc/ is part of the one extension: adding an ISA path is a new kernels file plus a row
# in the ISA table (csrc/isa.cpp), nothing here.
SOURCES: tuple[str, ...] = tuple(sorted(p.name for p in CSRC.glob("*.cpp")))
HEADERS: tuple[str, ...] = tuple(sorted(p.name for p in CSRC.glob("*.h")))
# -fopenmp: at::parallel_for is a header template that only runs threads when compiled with OpenMP
# (the extension then shares torch's own libgomp, already loaded under the same soname).
CFLAGS: tuple[str, ...] = ("-O3", "-std=c++17", "-fno-math-errno", "-fopenmp")
LDFLAGS: tuple[str, ...] = ("-fopenmp",)

_lock = threading.Lock()
_module: ModuleType | None = None


def cache_dir() -> Path:
    """Root of quept's on-disk cache: $QUEPT_CACHE_DIR, else ~/.cache/quept."""
    root = os.environ.get("QUEPT_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "quept"


def find_compiler() -> str | None:
    """Path of the C++ compiler the build would use, or None when there is none."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def build_key() -> str:
    """Hash of everything the binary depends on: sources, flags, torch and Python versions."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:12]


def _pybind_abi_flags() -> list[str]:
    from torch.utils import cpp_extension

    get = getattr(cpp_extension, "_get_pybind11_abi_build_flags", None)
    return list(get()) if get else []


def _build_direct(name: str, build_dir: Path, compiler: str) -> Path:
    """Compile and link with the compiler alone (no ninja), the flags torch's own build uses."""
    from torch.utils import cpp_extension

    out = build_dir / f"{name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if out.exists():
        return out
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    lib_dirs = [f"-L{p}" for p in cpp_extension.library_paths()]
    defines = [f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    objects, procs = [], []
    for src in SOURCES:  # compile in parallel; object names unique to this process
        obj = build_dir / f"{src}.{os.getpid()}.o"
        cmd = [compiler, "-c", str(CSRC / src), "-o", str(obj), "-fPIC", *CFLAGS, *defines, *_pybind_abi_flags(), *includes]
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        objects.append(str(obj))
    for cmd, proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd, stderr=err)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    link = [compiler, "-shared", *objects, "-o", str(tmp), *lib_dirs, "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
            *LDFLAGS]
    subprocess.run(link, check=True, capture_output=True, text=True)
    for obj in objects:
        Path(obj).unlink(missing_ok=True)
    tmp.rename(out)
    return out


def _import_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the native extension from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> ModuleType:
    name = f"quept_native_{build_key()}"
    build_dir = cache_dir() / "native" / name
    for built in sorted(build_dir.glob(f"{name}*.so")) if build_dir.is_dir() else []:
        try:  # built before (or shipped in an image): no compiler needed
            return _import_path(name, built)
        except (ImportError, OSError) as err:
            log.warning("cannot load the cached native kernels %s (%s); rebuilding", built, err)
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++); the native CPU kernels cannot be built")
    build_dir.mkdir(parents=True, exist_ok=True)
    log.warning("building the native CPU kernels (once per torch/Python version, about a minute) in %s", build_dir)
    start = time.perf_counter()
    from torch.utils import cpp_extension

    try:
        if shutil.which("ninja") is not None or _has_ninja_module():
            os.environ.setdefault("CXX", compiler)
            module = cpp_extension.load(
                name=name,
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(build_dir),
                verbose=False,
            )
        else:
            log.info("ninja not found; compiling the native kernels with %s directly", compiler)
            module = _import_path(name, _build_direct(name, build_dir, compiler))
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"building the native CPU kernels failed: {err.stderr or err}") from err
    log.info("native CPU kernels built in %.1f s", time.perf_counter() - start)
    return module


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and Path(bin_dir, "ninja").exists():
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        return True
    return False


def load_native() -> ModuleType:
    """The compiled extension (built on first use). Raises RuntimeError when it cannot be built."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            module = _build()
            isa = os.environ.get("QUEPT_NATIVE_ISA")
            if isa:
                if isa not in module.isa_names():
                    raise ValueError(f"QUEPT_NATIVE_ISA={isa!r}; choose one of {list(module.isa_names())}")
                module.set_isa(isa)
            refine = os.environ.get("QUEPT_NATIVE_W8_REFINE", "1")
            if refine not in ("0", "1"):
                raise ValueError(f"QUEPT_NATIVE_W8_REFINE={refine!r}; choose 0 or 1")
            module.set_w8_refine(refine == "1")
            log.info("native CPU kernels: ISA %s (available: %s)", module.current_isa(), module.available_isas())
            _module = module
    return _module


def isa_names() -> list[str]:
    """Every ISA path of the native kernels' table, slowest first (whether or not this CPU runs it)."""
    return list(load_native().isa_names())


def available_isas() -> list[str]:
    """ISA paths this CPU can run, slowest first (always includes 'generic')."""
    return list(load_native().available_isas())


def set_isa(name: str) -> None:
    """Select the ISA path for every later call (tests run each path this CPU has)."""
    module = load_native()
    if name not in module.isa_names():
        raise ValueError(f"unknown ISA {name!r}; choose one of {list(module.isa_names())}")
    module.set_isa(name)


def current_isa() -> str:
    return str(load_native().current_isa())


def set_w8_refine(on: bool) -> None:
    """Width-8 rows: two-term activations (True, the default) or one int8 term (False), for later calls."""
    load_native().set_w8_refine(bool(on))


def w8_refine() -> bool:
    return bool(load_native().w8_refine())


def main() -> None:
    """`python -m quept.kernels.native`: build (or find) the extension now, e.g. while building an image."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = load_native()
    log.info("%s: ISA %s (available: %s)", module.__file__, module.current_isa(), ", ".join(module.available_isas()))


if __name__ == "__main__":
    main()
