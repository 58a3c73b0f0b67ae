"""The layering of the pipeline, checked by reading the source with ast (STYLE.md, principle 12).

Data flows recipe -> hardware profile -> model inventory -> plan -> engine -> trainers -> run loop ->
CLI (docs/architecture.md). Each stage may import the stages before it, never one after it: a stage
that reached forward would re-decide what a later one owns. Below them all sit the shared base modules
and telemetry's records (events, the timeline the engine reports into, metrics.jsonl's format); the
sinks that draw those records sit beside the run loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).parents[2] / "fuyoucli"

# Lower number: earlier in the flow. A module may import modules of its own level or lower.
LEVELS = {
    "errors": 0, "resources": 0, "paths": 0, "folder_lock": 0, "interrupts": 0,
    "telemetry.events": 0, "telemetry.timeline": 0, "telemetry.jsonl": 0,
    "recipe": 1,
    "hardware": 2, "kernels": 2,
    "model": 3,
    "plan": 4,
    "engine": 5,
    "train": 6, "checkpoint": 6,
    "distributed": 7, "export": 7, "generate": 7, "telemetry": 7,
    "cli": 8, "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level(module: str) -> int:
    """The level of a fuyoucli module name (without the 'fuyoucli.' prefix): the longest listed prefix."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LEVELS:
            return LEVELS[key]
    raise AssertionError(f"fuyoucli.{module} has no level in LEVELS: add it where it belongs in the flow")


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative: resolve against the package
                base = module_name(path).split(".")[: -node.level]
                names.add("fuyoucli." + ".".join(base + [node.module]))
            else:
                names.add(node.module)
    return names


def files(*parts: str) -> list[Path]:
    target = PKG.joinpath(*parts)
    return [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))


def dotted(node: ast.AST) -> str:
    """'torch.cuda.synchronize' for an Attribute chain over a Name; '' when the chain ends elsewhere."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    parts.append(node.id)
    return ".".join(reversed(parts))


def test_imports_point_back_along_the_flow_only():
    bad = []
    for path in files(""):
        here = module_name(path)
        for name in imports_of(path):
            if name.startswith("fuyoucli."):
                there = name.removeprefix("fuyoucli.")
                if level(there) > level(here):
                    bad.append(f"{here} -> {there}")
    assert not bad, "imports that reach forward in the flow: " + ", ".join(sorted(bad))


def test_no_private_names_imported_across_modules():
    bad = []
    for path in files(""):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fuyoucli"):
                bad += [f"{module_name(path)} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.endswith("__")]
    assert not bad, bad


# plan/ is arithmetic over data: the run and the CLI hand it a Workload and a Machine.
PLAN_FORBIDDEN_MODULES = {"torch", "fuyoucli.recipe", "fuyoucli.hardware", "os", "pathlib", "io", "shutil",
                          "json", "yaml", "safetensors", "tempfile", "glob"}
FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "load", "dump"}


def test_plan_is_pure():
    for path in files("plan"):
        rel = path.relative_to(PKG)
        bad = {n for n in imports_of(path)
               if any(n == m or n.startswith(m + ".") for m in PLAN_FORBIDDEN_MODULES)}
        assert not bad, f"{rel} imports {bad}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                assert name not in FILE_CALLS, f"{rel}:{node.lineno} calls {name}(): plan/ does no file I/O"


def test_recipe_and_record_modules_import_no_torch():
    pure = files("recipe.py") + files("errors.py") + files("resources.py") + files("telemetry", "events.py") \
        + files("train", "lr_schedule.py")
    for path in pure:
        bad = {n for n in imports_of(path) if n == "torch" or n.startswith("torch.")}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_trainers_and_models_never_import_rich_or_the_cli():
    for path in files("train") + files("model") + files("engine") + files("checkpoint.py"):
        bad = {n for n in imports_of(path) if n.split(".")[0] == "rich" or n.startswith("fuyoucli.cli")}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_only_yaml_reader_is_recipe():
    for path in files(""):
        if path.name != "recipe.py":
            assert "yaml" not in imports_of(path), f"{path.relative_to(PKG)} reads YAML; only recipe.py may"


# Every CUDA call the training path makes goes through the lanes module, so one file holds every
# stream, event, synchronize and device query, with a CPU stand-in for each. The hardware probe is the
# one other place: it measures the raw device (link bandwidth both ways at once, the context's size)
# before any engine exists.
CUDA_OWNERS = {"engine/lanes.py", "hardware/probe.py"}


def cuda_uses(path: Path) -> list[str]:
    """Every torch.cuda / torch.backends.cuda name (the whole chain, once) and every tensor.cuda() call."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            name = dotted(node)
            if name == "torch.cuda" or name.startswith(("torch.cuda.", "torch.backends.cuda")):
                out.append(f"{node.lineno}: {name}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            out.append(f"{node.lineno}: .cuda()")
    return out


def test_cuda_only_in_the_lanes_module():
    bad = {}
    for path in files(""):
        rel = str(path.relative_to(PKG))
        if rel not in CUDA_OWNERS and (uses := cuda_uses(path)):
            bad[rel] = uses
    assert not bad, f"CUDA used outside engine/lanes.py: {bad}"


def test_the_cuda_check_sees_a_call(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import torch\n\ndef f(t, machine):\n    torch.cuda.synchronize()\n"
                      "    if machine.cuda:\n        return t.cuda()\n")
    assert cuda_uses(sample) == ["4: torch.cuda.synchronize", "6: .cuda()"]


def test_functions_in_plan_and_train_stay_short():
    long = []
    for path in files("plan") + files("train"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(PKG)}:{node.name} ({n} lines)")
    assert not long, long


def test_long_modules_say_why():
    for path in files(""):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 400:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "Why it is long:" in doc, f"{path.relative_to(PKG)} is over 400 lines; say why at its top"
