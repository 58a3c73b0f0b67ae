"""Known failures, each one line for the user: the CLI maps them to a message and an exit code.

Imported by every stage; imports nothing of fuyou's and no torch.
"""

from __future__ import annotations


class FuyouError(Exception):
    """A failure the user can fix; its message is one or a few lines and says how."""

    exit_code = 1


class RecipeError(FuyouError):
    """The recipe (or a --set override) is malformed, has an unknown key or a bad value."""

    exit_code = 2


class InputError(FuyouError):
    """A path the run needs is missing or unreadable (model folder, data file, profile)."""

    exit_code = 2


class ModelError(FuyouError):
    """The model folder exists but cannot be loaded or decomposed the way the run needs."""

    exit_code = 2


class DataError(FuyouError):
    """A data file exists but its records do not fit the recipe's format."""

    exit_code = 2


class ResourceError(FuyouError):
    """The machine ran out of something (memory, disk) during a run."""

    exit_code = 3


class InfeasiblePlan(FuyouError):
    """The planner found no placement that fits this machine; the report says what binds and what would fit."""

    exit_code = 2
