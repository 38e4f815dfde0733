"""The documentation builds with warnings as errors, and every example in it runs.

Both builds run ``sphinx-build`` in a fresh interpreter (the docs import their
``docs/examples/shear.py``, which registers a transform; this process keeps the built-in
registry) with ``WEIGHTCOND_DOCS_OFFLINE=1``: no intersphinx inventories are fetched, so the
result does not depend on the network (see the note in ``docs/conf.py``). The HTML build
fails on any warning — a broken reference (``nitpicky``), a docstring Sphinx cannot parse,
a transform without its page; the doctest build fails on any failing example, in the pages
or in the docstrings autodoc pulls in.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import weightcond
import weightcond.transforms

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def sphinx_build(builder: str, out: Path, doctrees: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEIGHTCOND_DOCS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", builder, "-d",
         str(doctrees), str(DOCS), str(out)],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def doctrees(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("doctrees")


def test_html_builds_without_warnings(tmp_path: Path, doctrees: Path) -> None:
    result = sphinx_build("html", tmp_path / "html", doctrees)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "WARNING" not in log, log[-6000:]
    # every public name has its entry in the reference: an anchor id="weightcond.<name>"
    # (id="module-weightcond.<name>" for a module) on the API page, a transform's page or
    # the diagnostics page (which holds weightcond.analysis)
    pages = "".join(p.read_text(encoding="utf-8") for p in [
        tmp_path / "html" / "api.html", tmp_path / "html" / "diagnostics.html",
        *(tmp_path / "html" / "transforms").glob("*.html")])
    public = [(weightcond, n) for n in weightcond.__all__ if n != "__version__"]
    public += [(weightcond.transforms, n) for n in weightcond.transforms.__all__]
    missing = []
    for namespace, name in public:
        full = f"{namespace.__name__}.{name}"
        anchor = f"module-{full}" if inspect.ismodule(getattr(namespace, name)) else full
        if f'id="{anchor}"' not in pages:
            missing.append(full)
    assert not missing, f"public names without a reference entry: {missing}"


def test_doctests_pass(tmp_path: Path, doctrees: Path) -> None:
    result = sphinx_build("doctest", tmp_path / "doctest", doctrees)
    log = result.stdout + result.stderr
    report = (tmp_path / "doctest" / "output.txt").read_text(encoding="utf-8")
    assert result.returncode == 0, report[-6000:] + log[-3000:]
    summary = report[report.index("Doctest summary"):]
    assert re.search(r"\b0 failures in tests", summary), summary
    ran = int(re.search(r"(\d+) tests", summary).group(1))
    assert ran >= 150, f"only {ran} doctest examples ran:\n{summary}"
