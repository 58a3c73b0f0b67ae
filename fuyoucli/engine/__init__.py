"""Engine: tiers, lanes, residency and the executor that streams blocks between homes and the device."""
