"""Sphinx configuration for the weightcond documentation.

Build (warnings are errors)::

    sphinx-build -W docs docs/_build/html          # the HTML pages
    sphinx-build -W -b doctest docs docs/_build/doctest   # run every example

``tests/test_sphinx.py`` runs both builds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# the package is installed (editable) by `pip install -e ".[docs]"`; the source tree comes
# first so that a checkout's docs always describe that checkout
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE / "_ext"))  # weightcond_docs: tables generated from the registries
sys.path.insert(0, str(HERE / "examples"))  # shear.py, the "writing your own transform" example

import weightcond  # noqa: E402

project = "weightcond"
author = "weightcond developers"
copyright = "weightcond developers"
release = weightcond.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",
    "weightcond_docs",
]

exclude_patterns = ["_build"]
templates_path: list[str] = []

html_theme = "furo"
html_title = f"weightcond {release}"

# -- autodoc / napoleon ----------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": False}
python_use_unqualified_type_names = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [("Class attributes", "params_style")]

# -- doctest ---------------------------------------------------------------------------------
# Every ``>>>`` example, in the pages and in the docstrings autodoc pulls in, runs under
# `sphinx-build -b doctest`. Seeded so that examples that train are reproducible.
doctest_global_setup = """
import torch
import weightcond as wc
torch.manual_seed(0)
"""

# -- cross references ------------------------------------------------------------------------
# Nitpicky: every reference to a weightcond name must resolve, or the build fails.
nitpicky = True

# Decision (offline builds): intersphinx needs the network to fetch the Python and PyTorch
# inventories, and a fetch that fails is a warning, i.e. an error under `-W`. We ship no
# copy of those inventories (a hand-made one would be a guess at PyTorch's URLs). So:
# * WEIGHTCOND_DOCS_OFFLINE=1 (set by tests/test_sphinx.py, and by anyone building without
#   network) drops the mapping: links to torch and Python are rendered as plain text;
# * otherwise the mapping below is used and the inventories are fetched (10 s timeout).
# In both modes only references into weightcond are checked strictly. References into
# torch / Python / typing (mostly from type hints, which autodoc writes with the defining
# module, e.g. ``torch.nn.modules.module.Module`` rather than the documented
# ``torch.nn.Module``) are linked when an inventory resolves them and left as text
# otherwise: see nitpick_ignore_regex.
OFFLINE = os.environ.get("WEIGHTCOND_DOCS_OFFLINE", "") not in ("", "0")
intersphinx_mapping = {} if OFFLINE else {
    "python": ("https://docs.python.org/3", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
}
intersphinx_timeout = 10

_EXTERNAL = (r"(torch|typing|collections|builtins|enum|contextlib|einops|geotorch|os|pathlib|json"
             r"|safetensors|transformers|peft)(\..*)?")
_BUILTINS = (r"(int|float|str|bool|bytes|object|type|dict|list|tuple|set|frozenset|None|"
             r"Ellipsis|Exception|ValueError|TypeError|KeyError|RuntimeError|Any|Callable|"
             r"Iterator|Iterable|Mapping|Generic|T|ClassVar|Tensor)")
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    (r"py:.*", _BUILTINS),
]
# the type variable of the generic Registry[T] (in its base classes and signatures): a
# TypeVar has no page to link to
nitpick_ignore = [("py:class", "weightcond.registry.T"), ("py:obj", "weightcond.registry.T")]
