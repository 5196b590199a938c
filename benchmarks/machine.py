"""The machine: CPU description, the probes that define the floor, and process memory readings.

The floor of a workload (see ``workloads.floor_seconds``) divides bytes by the *measured* memory
read bandwidth and FLOPs by the *measured* GEMM rate, both probed in the same run with the same
thread count as the engines, so "x floor" compares an engine with this machine, not a datasheet.
"""
import mmap
import os
import platform
import re
import resource
import sys
import time
from importlib import metadata

# /proc/cpuinfo flags worth knowing for these kernels (SIMD width, bf16 dot products, AMX tiles).
FEATURE_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                 "amx_int8")
PACKAGES = ("torch", "transformers", "ctranslate2", "triton", "numpy")
# What ``--cpu-isa`` sets so that every engine of a run (torch's own kernels, MKL, oneDNN,
# CTranslate2, umt5_fast's C++ kernels) is held to the same instruction sets: one machine then
# measures what a CPU with fewer of them runs. "avx512" is AVX-512 with BF16 and VNNI, no AMX tiles.
# Each library reads its variable when it first needs it, so the run sets them before any engine
# starts; measurements run in spawned processes, which inherit them.
ISA_CAP_ENVIRONMENT = {
    "avx2": dict(UMT5_FAST_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                 ONEDNN_MAX_CPU_ISA="AVX2", CT2_FORCE_CPU_ISA="AVX2"),
    "avx512": dict(UMT5_FAST_CPU_ISA="avx512", ATEN_CPU_CAPABILITY="avx512", MKL_ENABLE_INSTRUCTIONS="AVX512",
                   ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16", CT2_FORCE_CPU_ISA="AVX512"),
}


# ---------------------------------------------------------------------------------------------
# CPU description
# ---------------------------------------------------------------------------------------------
def _cpuinfo_blocks():
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return []
    blocks = []
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        blocks.append(fields)
    return blocks


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask), e.g. inside a container."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo, else the logical CPU count."""
    cores = {(b.get("physical id"), b.get("core id")) for b in _cpuinfo_blocks() if "core id" in b}
    return len(cores) or os.cpu_count() or 1


def default_threads() -> int:
    """One thread per physical core this process can use (hyper-threads do not help GEMMs)."""
    return max(1, min(physical_cores(), usable_cpus()))


def cpu_description() -> dict:
    blocks = _cpuinfo_blocks()
    first = blocks[0] if blocks else {}
    flags = set(first.get("flags", "").split())
    return {
        "model": first.get("model name") or platform.processor() or platform.machine(),
        "features": [f for f in FEATURE_FLAGS if f in flags],
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
    }


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import umt5_fast
        from umt5_fast.ops import available_backends
        versions["umt5_fast"] = umt5_fast.__version__
        versions["umt5_fast_backends"] = available_backends()
    except ImportError as exc:  # the suite still describes the machine
        versions["umt5_fast"] = f"not importable ({exc})"
    return versions


# ---------------------------------------------------------------------------------------------
# Probes (the parent's at the start, and the measuring processes' bandwidth between their calls)
# ---------------------------------------------------------------------------------------------
def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_read_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Streaming-read bandwidth in bytes/s: best time of ``torch.sum`` over a ``size_bytes`` tensor.

    The tensor lives in its own anonymous mapping, not in malloc's memory: freeing a malloc'd block
    this large raises glibc's mmap threshold to 32 MiB, which would change how the measuring
    process's later calls get their memory (the suite probes between timed calls)."""
    import torch
    buffer = mmap.mmap(-1, size_bytes)
    try:
        data = torch.frombuffer(buffer, dtype=torch.float32).fill_(1.0)
        seconds = _best_seconds(lambda: data.sum(), repeats)
        del data  # (the mapping closes only once nothing points into it)
    finally:
        buffer.close()
    return size_bytes / seconds


def measure_gemm_rate(dtype_name: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of ``torch.mm`` on two ``n x n`` matrices of ``dtype_name`` (best of ``repeats``)."""
    import torch
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    seconds = _best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    return 2.0 * n ** 3 / seconds


def cap_instruction_sets(isa: str, restart_argv):
    """Hold every engine of this run to ``isa`` (a key of ISA_CAP_ENVIRONMENT). oneDNN reads its
    cap when torch loads, so the process starts again as ``restart_argv`` with the caps set (once:
    the new process finds them set)."""
    wanted = ISA_CAP_ENVIRONMENT[isa]
    if all(os.environ.get(name) == value for name, value in wanted.items()):
        return
    os.environ.update(wanted)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, restart_argv)


def describe_machine(threads: int, gemm_dtypes=("float32",), quick: bool = False) -> dict:
    """Everything the report header needs, with the probes measured now on ``threads`` threads."""
    import torch
    torch.set_num_threads(threads)
    repeats = 3 if quick else 7
    bandwidth = measure_read_bandwidth(size_bytes=(1 << 29) if quick else (1 << 30), repeats=repeats)
    # Where oneDNN has no bf16 (AVX2-only CPUs) torch.mm in bf16 runs a slow loop (0.3 GFLOP/s
    # seen on a Zen 3: minutes for this probe), and the fp32 GEMM of the widened operands is the
    # faster bf16 GEMM (the cpu backend runs that): the floor takes the fp32 rate there. Likewise
    # fp16 without AVX512-FP16 / AMX-FP16; with bf16 / fp16 instructions the faster of the two.
    native = {"bfloat16": getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)(),
              "float16": getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)()}
    measured = [name for name in gemm_dtypes if native.get(name, True)]
    gemm = {name: measure_gemm_rate(name, repeats=repeats) for name in measured}
    for half in set(gemm_dtypes) & set(native):
        if "float32" not in gemm:
            gemm["float32"] = measure_gemm_rate("float32", repeats=repeats)
        gemm[half] = max(gemm.get(half, 0.0), gemm["float32"])
    return {
        "cpu": cpu_description(),
        "threads": threads,
        "read_bandwidth_gbs": bandwidth / 1e9,
        "gemm_gflops": {name: rate / 1e9 for name, rate in gemm.items()},
        "versions": package_versions(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa_cap": os.environ.get("UMT5_FAST_CPU_ISA") or None,
    }


def busy_warning(info: dict):
    """A warning when other processes already keep the CPUs busy (timings will be noisy), else None."""
    load = info.get("load_average_1m")
    if load is None or load < 0.5 * info["cpu"]["usable_cpus"]:
        return None
    return (f"warning: load average {load:.1f} on {info['cpu']['usable_cpus']} CPUs before the run: other "
            "processes compete for the cores, so timings will be slow and noisy")


# ---------------------------------------------------------------------------------------------
# Process memory (Linux: /proc/self/status; elsewhere: getrusage's lifetime peak)
# ---------------------------------------------------------------------------------------------
def _status_kib(field: str):
    try:
        text = open("/proc/self/status", encoding="utf-8").read()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def current_rss_mb() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak RSS since the process started or since the last ``reset_peak_rss``."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS mark at the current RSS (Linux >= 4.0); False if unsupported.

    Called after loading, so that the peak of a workload does not include loading's transients.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
