"""The README's recipe reference is the schema's own, its set-up commands are the CI's, and the tests it cites
to back a claim exist."""

from __future__ import annotations

import re
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


def test_the_tests_the_readme_cites_exist():
    """A claim a recipe cannot reproduce (lr=0 leaves weights bit-identical: method.lr must be > 0) names the test
    that checks it; every `pytest FILE -k NAME` in the README must select a test."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cited = re.findall(r"pytest (tests/\S+\.py) -k (\w+)", readme)
    assert ("tests/integration/test_zo2_parity.py", "lr_zero") in cited
    for path, name in cited:
        assert re.search(rf"^def test_\w*{name}", (ROOT / path).read_text(encoding="utf-8"), re.M), (path, name)
