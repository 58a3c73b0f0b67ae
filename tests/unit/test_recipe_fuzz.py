"""Malformed recipes (wrong types, unknown keys, missing sections, absurd values, non-YAML, bad --set):
each one is a one-line error and exit code 2 from the real CLI entry point, never a traceback.

Every generated recipe is broken by construction (one defect on a valid base, or text no recipe can be),
so no example ever trains. The CLI runs in-process (fuyoucli.cli.app.main) to keep 100s of examples fast.
"""

from __future__ import annotations

import copy
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuyoucli.cli.app import main
from fuyoucli.recipe import Recipe

# Fields that take a scalar: a list or a mapping is the wrong type for every one of them.
SCALARS = [("model", "path"), ("model", "dtype"), ("model", "head"), ("method", "lr"), ("method", "eps"),
           ("method", "q"), ("method", "variant"), ("method", "schedule"), ("method", "warmup_steps"),
           ("data", "max_length"), ("data", "format"), ("data", "eval_fraction"), ("data", "packing"),
           ("training", "max_steps"), ("training", "batch_size"), ("training", "seed"), ("training", "output_dir"),
           ("training", "checkpoint_every"), ("training", "keep_checkpoints"), ("training", "grad_accum"),
           ("offload", "mode"), ("offload", "prefetch_depth"), ("name",)]

NOT_FINITE = st.sampled_from([float("inf"), float("-inf"), float("nan")])
# Values outside each field's range (or not finite): absurd, and refused by the schema.
ABSURD = {
    ("method", "lr"): st.one_of(st.floats(max_value=0.0, allow_nan=False), NOT_FINITE),
    ("method", "eps"): st.one_of(st.floats(max_value=0.0, allow_nan=False), NOT_FINITE),
    ("method", "q"): st.one_of(st.integers(max_value=0), st.integers(min_value=65, max_value=10**12)),
    ("method", "warmup_steps"): st.integers(max_value=-1),
    ("data", "max_length"): st.integers(max_value=7),
    ("data", "eval_fraction"): st.one_of(st.floats(min_value=1.0, allow_nan=False, allow_infinity=False),
                                         st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)),
    ("training", "max_steps"): st.integers(max_value=0),
    ("training", "batch_size"): st.integers(max_value=0),
    ("training", "grad_accum"): st.integers(max_value=0),
    ("training", "keep_checkpoints"): st.integers(max_value=0),
    ("training", "checkpoint_every"): st.integers(max_value=-1),
    ("training", "checkpoint_minutes"): st.one_of(st.floats(max_value=-1e-9, allow_nan=False), NOT_FINITE),
    ("offload", "prefetch_depth"): st.integers(max_value=-1),
    ("model", "dtype"): st.sampled_from(["float8", "int4", "fp32 ", "FLOAT32"]),
    ("method", "name"): st.sampled_from(["sgd", "ZO2", "adam", ""]),
}
REQUIRED = [("model",), ("method",), ("data",), ("training",), ("model", "path"), ("data", "train"), ("method", "name")]
SECTIONS = [(), ("model",), ("method",), ("data",), ("training",), ("offload",), ("hardware",)]
WRONG_TYPE = st.one_of(st.lists(st.integers(), min_size=1, max_size=3),
                       st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=4), st.integers(),
                                       min_size=1, max_size=2))
KEY = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)


def known_keys(section: tuple) -> set[str]:
    if not section:
        return set(Recipe.model_fields)
    if section == ("method",):
        return {"name", "lr", "schedule", "warmup_steps", "weight_decay", "eps", "q", "variant", "momentum",
                "betas", "max_grad_norm"}
    return set(Recipe.model_fields[section[0]].annotation.model_fields)


def put(doc: dict, path: tuple, value) -> None:
    node = doc
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def duplicated(draw, doc: dict) -> str:
    """The recipe's YAML with one of its keys given a second time (a section or a key inside one), with a
    value that would be valid on its own: only the repetition is wrong."""
    lines = yaml.safe_dump(doc, default_flow_style=False).splitlines()
    keyed = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("-")]
    i = draw(st.sampled_from(keyed))
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    # The copy goes after the whole block the key opens (its deeper-indented lines), still inside its mapping.
    end = i + 1
    while end < len(lines) and (lines[end].startswith(indent + " ") or lines[end].startswith(indent + "-")):
        end += 1
    lines[end:end] = lines[i:end]
    return "\n".join(lines) + "\n"


@st.composite
def malformed(draw, base: dict) -> tuple[str | bytes, list[str]]:
    """(recipe file content, extra CLI arguments), with exactly one defect."""
    kind = draw(st.sampled_from(["wrong_type", "unknown_key", "missing", "absurd", "not_yaml", "bytes", "bad_set",
                                 "duplicate_key"]))
    doc = copy.deepcopy(base)
    if kind == "duplicate_key":
        return duplicated(draw, doc), []
    if kind == "wrong_type":
        put(doc, draw(st.sampled_from(SCALARS)), draw(WRONG_TYPE))
    elif kind == "unknown_key":
        section = draw(st.sampled_from(SECTIONS))
        key = draw(KEY.filter(lambda k: k not in known_keys(section)))
        put(doc, section + (key,), draw(st.one_of(st.integers(), st.text(max_size=5))))
    elif kind == "missing":
        path = draw(st.sampled_from(REQUIRED))
        node = doc
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
    elif kind == "absurd":
        path = draw(st.sampled_from(sorted(ABSURD)))
        put(doc, path, draw(ABSURD[path]))
    elif kind == "not_yaml":
        return draw(st.text(max_size=80).filter(lambda t: "model" not in t)), []
    elif kind == "bytes":
        return draw(st.binary(min_size=1, max_size=60)), []
    else:
        setting = draw(st.one_of(
            KEY,  # no '='
            st.builds(lambda k: f"training.{k}=1", KEY.filter(lambda k: k not in known_keys(("training",)))),
            st.sampled_from(["training..seed=1", "=3", "model.path.x=1", "training.batch_size=many",
                             "training.max_steps=0", "method.lr=-1", "method.lr=.nan", "data=[1]"]),
        ))
        return yaml.safe_dump(doc), ["--set", setting]
    return yaml.safe_dump(doc, allow_unicode=True), []


@pytest.fixture(scope="module")
def base(tiny_models, text_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fuzz") / "out"
    return {"model": {"path": str(tiny_models["llama"])}, "method": {"name": "zo2", "lr": 1e-3},
            "data": {"train": [str(text_data)], "max_length": 32},
            "training": {"max_steps": 1, "batch_size": 2, "output_dir": str(out)}}


def test_malformed_recipes_are_one_line_exit_2(base, capsys):
    folder = Path(tempfile.mkdtemp(prefix="fuyou-fuzz-"))
    seen = {"count": 0}

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=malformed(base))
    def check(case):
        content, args = case
        path = folder / "recipe.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(SystemExit) as info:
            main(["finetune", str(path), *args])
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert info.value.code == 2, (content, args, captured.out, err)
        assert "Traceback" not in captured.err and "Traceback" not in captured.out
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(("fuyou: error:", "Error:")), err
        seen["count"] += 1

    check()
    assert seen["count"] >= 100
    assert not Path(base["training"]["output_dir"]).exists()  # no example started a run
