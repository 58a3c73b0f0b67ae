"""Hardware profile stage: what the machine can do, measured once (probe) or named (presets).

A run loads a HardwareProfile with load_profile() and train.plan_inputs turns it into the planner's
Machine; nothing here imports torch at package import time (probe.py imports it inside its
functions, and only the CLI, train.planning's first-run profiling and tests import probe).
"""

from fuyoucli.hardware.profile import (
    SCHEMA_VERSION,
    HardwareProfile,
    default_profile_path,
    load_profile,
    save_profile,
)

__all__ = ["SCHEMA_VERSION", "HardwareProfile", "default_profile_path", "load_profile", "save_profile"]
