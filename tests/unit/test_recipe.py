"""Recipe loading: every shipped recipe validates; bad input gives one located line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuyoucli.errors import FuyouError, RecipeError
from fuyoucli.recipe import AdamWMethod, Recipe, ZO2Method, load_recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def minimal(model: Path, data: Path, method: str = "name: adamw") -> str:
    return (f"model:\n  path: {model}\nmethod:\n  {method}\ndata:\n  train: {data}\n"
            "training:\n  max_steps: 2\n")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.training.output_dir.startswith("runs/")


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "zo2-sentiment.yaml"}


def test_minimal_recipe_defaults(tmp_path, tiny_models, text_data):
    r = load_recipe(write(tmp_path, minimal(tiny_models["llama"], text_data)))
    assert isinstance(r.method, AdamWMethod) and r.method.max_grad_norm == 1.0
    assert r.model.trust_remote_code is False
    assert r.data.train == [str(text_data)]
    assert r.offload.mode == "auto"
    with pytest.raises(Exception):
        r.training.seed = 3  # frozen


def test_set_overrides_any_field(tmp_path, tiny_models, text_data):
    path = write(tmp_path, minimal(tiny_models["llama"], text_data, "name: zo2"))
    r = load_recipe(path, ["method.eps=0.01", "training.max_steps=7", "peft.type=lora", "peft.r=4",
                           "data.fields={text: body}"])
    assert isinstance(r.method, ZO2Method)
    assert (r.method.eps, r.training.max_steps, r.peft.r, r.data.fields) == (0.01, 7, 4, {"text": "body"})


def test_every_field_has_a_docstring():
    from pydantic import BaseModel

    seen = set()

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        for name, field in cls.model_fields.items():
            ann = field.annotation
            subs = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subs.append(ann)
            if subs:
                for sub in subs:
                    walk(sub)
            else:
                assert field.description, f"{cls.__name__}.{name} has no docstring"

    walk(Recipe)
    walk(ZO2Method)
    walk(AdamWMethod)


CASES = [
    # (yaml edit, expected substrings)
    (lambda m, d: minimal(m, d, "name: zo2\n  epss: 0.1"), ["recipe.yaml:5", "unknown key 'method.epss'", "did you mean 'eps'"]),
    (lambda m, d: minimal(m, d) + "trainng:\n  seed: 1\n", ["recipe.yaml:9", "unknown key 'trainng'", "did you mean 'training'"]),
    (lambda m, d: minimal(m, d, "name: adamw\n  lr: fast"), ["recipe.yaml:5", "method.lr = 'fast'", "number"]),
    (lambda m, d: minimal(m, d, "name: adamw\n  lr: -1"), ["method.lr = -1", "greater than 0"]),
    (lambda m, d: minimal(m, d, "name: sgd"), ["recipe.yaml:4", "zo2, adamw", "'sgd'"]),
    (lambda m, d: minimal(Path("/no/such/model"), d), ["recipe.yaml:2", "model.path not found: /no/such/model"]),
    (lambda m, d: minimal(m, Path("/no/such/data.jsonl")), ["recipe.yaml:6", "data.train not found"]),
    (lambda m, d: minimal(m.parent, d), ["recipe.yaml:2", "no config.json"]),
    (lambda m, d: "model: [\n  path: x\n", ["recipe.yaml:3", "malformed YAML"]),
    (lambda m, d: "", ["recipe is empty"]),
    (lambda m, d: "- a\n- b\n", ["recipe.yaml:1", "mapping"]),
    (lambda m, d: minimal(m, d).replace("max_steps: 2", "max_steps: 2\n  epochs: 1"), ["set exactly one of max_steps and epochs"]),
    (lambda m, d: minimal(m, d).replace("training:\n  max_steps: 2\n", ""), ["missing required key 'training'"]),
    (lambda m, d: minimal(m, d) + "peft:\n  r: 4\n", ["only apply with type: lora"]),
    (lambda m, d: minimal(m, d, "name: zo2\n  momentum: 0.5"), ["variant: momentum"]),
    (lambda m, d: minimal(m, d) + "  batch_size: 0\n", ["training.batch_size = 0"]),
    # A key given twice would silently keep the last (lr 5.0; the second training block drops max_steps).
    (lambda m, d: minimal(m, d, "name: adamw\n  lr: 1.0e-3\n  lr: 5.0"), ["recipe.yaml:6", "duplicate key 'lr'",
                                                                         "lines 5 and 6"]),
    (lambda m, d: minimal(m, d) + "training:\n  seed: 3\n", ["recipe.yaml:9", "duplicate key 'training'",
                                                             "lines 7 and 9"]),
]


def test_yaml_merge_keys_still_override(tmp_path, tiny_models, text_data):
    """Duplicate keys are refused, but a merge (`<<: *base`) overriding a merged key is YAML by design."""
    path = write(tmp_path, minimal(tiny_models["llama"], text_data).replace(
        "training:\n  max_steps: 2\n", "training:\n  <<: &b {max_steps: 2, seed: 1}\n  seed: 7\n"))
    r = load_recipe(path)
    assert (r.training.max_steps, r.training.seed) == (2, 7)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bad_recipes_give_located_one_line_errors(case, tmp_path, tiny_models, text_data):
    make, expected = CASES[case]
    path = write(tmp_path, make(tiny_models["llama"], text_data))
    with pytest.raises(FuyouError) as info:
        load_recipe(path)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert len(message.splitlines()) <= 3, message
    for text in expected:
        assert text in message, (text, message)


def test_bad_override_names_the_flag(tmp_path, tiny_models, text_data):
    path = write(tmp_path, minimal(tiny_models["llama"], text_data))
    with pytest.raises(RecipeError, match=r"--set training.max_stepz=3: unknown key 'training.max_stepz'; did you mean 'max_steps'"):
        load_recipe(path, ["training.max_stepz=3"])
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        load_recipe(path, ["training.max_steps"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_pkg_paths_name_the_missing_package(tmp_path, text_data):
    path = write(tmp_path, minimal("pkg:no_such_package_xyz/model.gguf", text_data))
    with pytest.raises(FuyouError, match="package 'no_such_package_xyz' is not installed"):
        load_recipe(path)


@pytest.mark.parametrize("model_extra,peft,expected", [
    ("  quantization: nf4\n", "", "model.quantization: nf4 stores a frozen base; full-parameter training updates "
                                  "every weight (set peft.type: lora"),
    ("  quantization: int4\n", "peft:\n  type: lora\n", "Input should be 'none', 'int8' or 'nf4'"),
])
def test_a_quantized_base_needs_lora(model_extra, peft, expected, tmp_path, tiny_models, text_data):
    path = write(tmp_path, f"model:\n  path: {tiny_models['llama']}\n{model_extra}method:\n  name: adamw\n{peft}"
                           f"data:\n  train: {text_data}\ntraining:\n  max_steps: 2\n")
    with pytest.raises(FuyouError) as info:
        load_recipe(path)
    assert len(str(info.value).splitlines()) == 1, str(info.value)
    assert expected in str(info.value)
    ok = write(tmp_path, f"model:\n  path: {tiny_models['llama']}\n  quantization: int8\nmethod:\n  name: zo2\n"
                         f"peft:\n  type: lora\ndata:\n  train: {text_data}\ntraining:\n  max_steps: 2\n")
    assert load_recipe(ok).model.quantization == "int8"
