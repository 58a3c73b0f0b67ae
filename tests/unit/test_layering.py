"""The layering of the pipeline, checked by reading imports with ast (STYLE.md, principle 12)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).parents[2] / "fuyoucli"


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def files(*parts: str) -> list[Path]:
    target = PKG.joinpath(*parts)
    return [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))


def test_recipe_and_pure_modules_import_no_torch():
    pure = files("recipe.py") + files("errors.py") + files("resources.py") + files("telemetry", "events.py") \
        + files("train", "lr_schedule.py")
    for path in pure:
        bad = {n for n in imports_of(path) if n == "torch" or n.startswith("torch.")}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_trainers_and_models_never_import_rich_or_the_cli():
    for path in files("train") + files("model") + files("checkpoint.py"):
        bad = {n for n in imports_of(path) if n.split(".")[0] == "rich" or n.startswith("fuyoucli.cli")}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_only_yaml_reader_is_recipe():
    for path in files(""):
        if path.name != "recipe.py":
            assert "yaml" not in imports_of(path), f"{path.relative_to(PKG)} reads YAML; only recipe.py may"


# The engine's lanes module owns every stream and event the training path uses. The hardware probe is
# the one other place: it times raw link bandwidth (both directions at once) before any engine exists.
STREAM_OWNERS = {"engine/lanes.py", "hardware/probe.py"}


def test_no_cuda_streams_outside_lanes():
    for path in files(""):
        text = path.read_text(encoding="utf-8")
        if str(path.relative_to(PKG)) not in STREAM_OWNERS:
            assert "cuda.Stream" not in text and "cuda.Event" not in text, path
