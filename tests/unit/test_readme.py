"""The README's recipe reference is the schema's own, and its set-up commands are the CI's."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_readme_recipe_reference_matches_the_schema():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from recipe_reference import reference
    finally:
        sys.path.pop(0)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert reference() in readme, "README is stale: paste the output of `python scripts/recipe_reference.py`"


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = "pip install torch==2.13.0 && pip install -e '.[test]' && pip install --no-deps -r requirements-offline.txt"
    assert install in readme
    assert install.replace("pip install", "pip install -q") in ci
    assert "python -m pytest -q" in readme and "\npython -m pytest -q\n" in ci
