"""One line naming the machine a benchmark ran on: CPU model, cores and vector ISA.

jaxcov-vs-torch ratios depend on the CPU (the XLA:CPU and torch kernels pick different code
paths by ISA and vendor), so every model benchmark prints this next to its numbers.
"""

import os
import platform

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            block = f.read().split("\n\n")[0]
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in block.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def machine_line() -> str:
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    flags = set(info.get("flags", "").split())
    isa = " ".join(flag for flag in ISA_FLAGS if flag in flags) or "no AVX2"
    return f"CPU: {name}, {os.cpu_count()} cores, {isa}"
