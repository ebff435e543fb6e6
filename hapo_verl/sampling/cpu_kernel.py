"""The compiled CPU backend of the fast path: ``cpu_kernel.c`` built on first use with the machine's C compiler.

Eager torch needs a separate ``exp`` pass over the logits (about five elementwise passes of time on a 2-core x86
machine); the C kernel fuses a polynomial ``exp2`` with the sums, so the processor stays within a few elementwise
passes (bench/bench_logits_processor.py, docs/benchmarks.md).

Build: ``$CC`` (default ``cc``, then ``gcc``) with ``-O3 -march=native -shared -fPIC -pthread`` and the packed
parameter layout of ``hapo_verl.sampling.params`` as ``-DHAPO_C_<COLUMN>=i`` (``LAYOUT_DEFINES``), once per source,
flags, compiler and CPU, into ``$HAPO_VERL_CACHE_DIR`` (default ``~/.cache/hapo_verl``)/kernels. Processes racing to
build (Ray workers) each write a temporary file and rename it into place. Where there is no compiler or the build
fails, the reason is logged once and the torch path is used; ``HAPO_VERL_CPU_KERNEL=0`` turns the kernel off.

Only fp32 CPU tensors whose rows are contiguous are handled here; ``fast_path`` checks that before calling.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from hapo_verl.algorithms.entropy import LOG_ENTROPY_FLOOR, REFERENCE_SAMPLER_LOG_FLOOR, REFERENCE_SAMPLER_SCALE_EPS
from hapo_verl.sampling.params import NUM_PARAMS, layout_constants

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.c")
ENV_SWITCH = "HAPO_VERL_CPU_KERNEL"
ENV_CACHE = "HAPO_VERL_CACHE_DIR"
#: must equal HAPO_KERNEL_ABI in cpu_kernel.c
ABI = 4
SIMD_NAMES = {512: "avx512", 256: "avx2", 0: "scalar"}
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")
#: the packed parameter layout (``hapo_verl.sampling.params``), handed to every build: cpu_kernel.c has no copy of it
LAYOUT_DEFINES = (*(f"-DHAPO_{name}={i}" for name, i in layout_constants().items()), f"-DHAPO_NUM_PARAMS={NUM_PARAMS}")

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "hapo_verl")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return sig + line
    except OSError:
        pass
    return sig + platform.processor()


def _build(cc: str, cflags: tuple[str, ...] = CFLAGS) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = (*cflags, *LAYOUT_DEFINES)
    key = hashlib.sha256(src + version.encode() + " ".join(flags).encode() + _cpu_signature().encode()).hexdigest()
    out = cache_dir() / f"hapo_cpu_kernel_{key[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders end with the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_library(cflags: tuple[str, ...] = CFLAGS) -> ctypes.CDLL:
    """Build (or reuse from the cache) and load the kernel with these flags; raises on any failure. ``library()``
    is the cached default; other flags are for tests (e.g. the AVX2 or plain-C variants on an AVX-512 machine)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc)")
    lib = ctypes.CDLL(str(_build(cc, tuple(cflags))))
    if lib.hapo_kernel_abi() != ABI:
        raise RuntimeError(f"kernel ABI {lib.hapo_kernel_abi()} != {ABI}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.hapo_row_entropy.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    f32 = ctypes.c_float
    lib.hapo_adaptive_temperature.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, f32, f32, f32, ctypes.c_int]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first call; None (reason logged once, see ``status``) if unavailable."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    if os.environ.get(ENV_SWITCH, "1") == "0":
                        raise RuntimeError(f"disabled by {ENV_SWITCH}=0")
                    lib = load_library()
                    _state["status"] = f"ok (simd={SIMD_NAMES.get(lib.hapo_kernel_simd(), 'scalar')})"
                except Exception as exc:  # noqa: BLE001 - any failure means: use the torch path, and say why
                    lib = None
                    _state["status"] = f"unavailable: {type(exc).__name__}: {exc}"
                    logger.warning("hapo-verl: compiled CPU kernel %s; the logits processor uses the slower "
                                   "torch path", _state["status"])
                _state["lib"] = lib
    return _state["lib"]


def available() -> bool:
    return library() is not None


def status() -> str:
    """'ok (simd=...)' or 'unavailable: <reason>' (builds on first call)."""
    library()
    return _state["status"]


def reset_for_tests() -> None:
    """Forget the loaded library so the next call re-reads the environment (tests only)."""
    with _lock:
        _state.clear()


def supports(logits: torch.Tensor) -> bool:
    """Tensors this kernel handles: fp32, CPU, 2-D with unit stride along the vocabulary."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and (logits.stride(1) == 1 or logits.shape[1] <= 1))


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _require(lib: ctypes.CDLL | None = None) -> ctypes.CDLL:
    if lib is not None:
        return lib
    lib = library()
    if lib is None:
        raise RuntimeError(f"hapo-verl CPU kernel {status()}")
    return lib


def _checked_rows(rows: torch.Tensor | None, n_logit_rows: int) -> torch.Tensor | None:
    """int64 contiguous row indices, bounds-checked (the C code trusts them)."""
    if rows is None:
        return None
    rows_c = rows.to(torch.int64).contiguous()
    if rows_c.numel() and (int(rows_c.min()) < 0 or int(rows_c.max()) >= n_logit_rows):
        raise IndexError(f"row index out of range for {n_logit_rows} rows")
    return rows_c


#: logits per extra thread: starting a thread costs ~40 us here, about the time of 150k logits of kernel work
MIN_LOGITS_PER_THREAD = 500_000


def _threads(n_rows: int, vocab: int) -> int:
    return max(1, min(torch.get_num_threads(), n_rows, n_rows * vocab // MIN_LOGITS_PER_THREAD))


def adaptive_temperature_(logits: torch.Tensor, params: torch.Tensor, rows: torch.Tensor | None = None,
                          lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The whole processor step, row by row: entropy, factor f (``row_temperature_factor_from_entropy``'s rule)
    and logits[rows[k]] /= f in place for enabled rows of the packed [k, 8] ``params`` (``hapo_verl.sampling.params``);
    returns f [k] (1 where disabled)."""
    lib = _require(lib)
    n = logits.shape[0] if rows is None else rows.numel()
    rows_c = _checked_rows(rows, logits.shape[0])
    table = params.to(torch.float32).contiguous()
    factors = torch.empty(n, dtype=torch.float32)
    if n:
        lib.hapo_adaptive_temperature(logits.data_ptr(), logits.stride(0), logits.shape[1], _ptr(rows_c),
                                      table.data_ptr(), n, factors.data_ptr(), LOG_ENTROPY_FLOOR,
                                      REFERENCE_SAMPLER_LOG_FLOOR, REFERENCE_SAMPLER_SCALE_EPS,
                                      _threads(n, logits.shape[1]))
    return factors


def row_entropy(logits: torch.Tensor, rows: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Entropy (nats) of softmax(input_scale[k] * logits[rows[k]]) per k (all rows when ``rows`` is None)."""
    lib = _require(lib)
    n = logits.shape[0] if rows is None else rows.numel()
    rows_c = _checked_rows(rows, logits.shape[0])
    scale_c = None if input_scale is None else input_scale.to(torch.float32).contiguous()
    out = torch.empty(n, dtype=torch.float32)
    if n:
        lib.hapo_row_entropy(logits.data_ptr(), logits.stride(0), logits.shape[1], _ptr(rows_c), _ptr(scale_c), n,
                             out.data_ptr(), _threads(n, logits.shape[1]))
    return out
