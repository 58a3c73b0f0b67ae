"""Presets describe themselves on their own terms: no references to documents or machines outside this
repository; the quickstart recipe's promised perplexity matches the README's measured one."""

from __future__ import annotations

import re
from pathlib import Path

from fuyoucli.hardware.presets import get_preset, preset_description, preset_names

ROOT = Path(__file__).parents[2]


def test_presets_cite_nothing_outside_the_repository():
    for name in preset_names():
        text = preset_description(name) + repr(get_preset(name))
        for word in ("BACKGROUND.md", "KINDS.md", "workplace", "lent"):
            assert word not in text, (name, word, text)
    source = (ROOT / "fuyoucli/hardware/presets.py").read_text()
    for word in ("BACKGROUND.md", "KINDS.md", "workplace"):
        assert word not in source, word


def test_quickstart_comment_matches_the_readme():
    comment = (ROOT / "recipes/quickstart.yaml").read_text()
    said = re.search(r"falls from about (\d+) to about (\d+)", comment)
    seen = re.search(r"held-out perplexity on Hamlet (\d+\.\d) -> (\d+\.\d)", (ROOT / "README.md").read_text())
    assert said and seen
    assert [int(x) for x in said.groups()] == [round(float(x)) for x in seen.groups()]
