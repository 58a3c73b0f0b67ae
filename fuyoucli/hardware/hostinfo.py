"""Hardware profile stage, host facts that need no timing: CPU model, memlock limit, current load.

Imports no torch (psutil only inside functions); probe.py calls these.
"""

from __future__ import annotations

import platform
from typing import Optional


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memlock_limit_bytes() -> Optional[int]:
    """The soft RLIMIT_MEMLOCK (`ulimit -l`) in bytes; None when unlimited or unknown."""
    try:
        import resource
    except ImportError:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def cpu_busy_percent() -> float:
    import psutil

    # Another job on the CPUs halves a 2-core machine's figures and wrecks multi-thread ones; say so.
    return psutil.cpu_percent(interval=0.2)
