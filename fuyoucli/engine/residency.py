"""Where each streamed block is, as one state machine per block; an illegal transition raises.

HOME -> IN_FLIGHT (fetch issued) -> RESIDENT (compute may use it) -> EVICTING (write-back issued,
or nothing to write) -> HOME (write-back known complete). Engine stage; no torch.
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    HOME = "home"
    IN_FLIGHT = "in_flight"
    RESIDENT = "resident"
    EVICTING = "evicting"


ALLOWED = {
    State.HOME: {State.IN_FLIGHT},
    State.IN_FLIGHT: {State.RESIDENT},
    State.RESIDENT: {State.EVICTING},
    State.EVICTING: {State.HOME},
}


class IllegalTransition(RuntimeError):
    pass


class Residency:
    def __init__(self, names: list[str], max_on_device: int):
        self.state = {name: State.HOME for name in names}
        self.max_on_device = max_on_device
        self.peak_on_device = 0

    def on_device(self) -> int:
        return sum(s in (State.IN_FLIGHT, State.RESIDENT) for s in self.state.values())

    def move(self, name: str, to: State) -> None:
        current = self.state[name]
        if to not in ALLOWED[current]:
            raise IllegalTransition(f"block {name}: {current.value} -> {to.value} is not allowed")
        self.state[name] = to
        count = self.on_device()
        if count > self.max_on_device:
            raise IllegalTransition(f"{count} blocks on the device at once; the plan allows {self.max_on_device}")
        self.peak_on_device = max(self.peak_on_device, count)
