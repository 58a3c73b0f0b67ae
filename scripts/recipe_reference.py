"""Print the recipe reference (every section and field with its type, default and docstring) as Markdown.

The README's "Recipe reference" is this script's output; tests/unit/test_readme.py checks they agree.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fuyoucli.recipe import AdamWMethod, Recipe, ZO2Method


def _type_name(ann) -> str:
    text = repr(ann) if not isinstance(ann, type) else ann.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def _section(title: str, cls: type[BaseModel], skip: set[str] = frozenset()) -> list[str]:
    lines = [f"**`{title}`**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        default = "required" if field.default is PydanticUndefined and field.default_factory is None else repr(
            field.default if field.default is not PydanticUndefined else field.default_factory())
        doc = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{name}` | `{_type_name(field.annotation)}` | `{default}` | {doc} |")
    return lines + [""]


def reference() -> str:
    out: list[str] = []
    for name, field in Recipe.model_fields.items():
        ann = field.annotation
        if name == "method":
            out += _section("method (name: zo2)", ZO2Method)
            out += _section("method (name: adamw)", AdamWMethod)
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _section(name, ann)
        else:
            doc = " ".join((field.description or "").split())
            out += [f"**`{name}`** (`{_type_name(ann)}`, default `{field.default!r}`): {doc}", ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
