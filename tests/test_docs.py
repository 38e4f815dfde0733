"""The docstring examples run (as doctests), and the README quickstart is the tested script."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import runpy
from pathlib import Path

import pytest

import weightcond

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(weightcond.__path__, "weightcond."))


@pytest.mark.parametrize("name", ["weightcond", *MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_some_docstrings_have_examples() -> None:
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for name in MODULES
                   for t in finder.find(importlib.import_module(name)))
    assert examples >= 10


def test_readme_quickstart_is_the_example_script_and_runs(capsys) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    script = (ROOT / "examples" / "quickstart.py").read_text()
    assert script in blocks
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "merged; max difference" in out


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"```bash\n# run the tests\n(.*?)\n```", readme, flags=re.S).group(1)
    for part in command.split(" && "):
        assert part.strip() in ci, part
