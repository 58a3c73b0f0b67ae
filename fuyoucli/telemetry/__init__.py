"""Telemetry: trainers emit events; sinks (console, JSONL, later the dashboard) consume them."""
