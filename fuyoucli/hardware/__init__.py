"""Hardware profile stage: what the machine can do, measured once (probe) or named (presets).

The planner reads HardwareProfile via load_profile(); nothing here imports torch at package import
time (probe.py imports it inside its functions, and only the CLI and tests import probe).
"""

from fuyoucli.hardware.profile import (
    SCHEMA_VERSION,
    HardwareProfile,
    default_profile_path,
    load_profile,
    save_profile,
)

__all__ = ["SCHEMA_VERSION", "HardwareProfile", "default_profile_path", "load_profile", "save_profile"]
