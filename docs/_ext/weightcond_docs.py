"""Sphinx directives that generate the docs' tables from the code, so the docs cannot drift.

* ``.. weightcond-transforms::`` — every entry of :data:`weightcond.TRANSFORMS`: its class,
  its options with their defaults (read from the constructor's signature) and whether it is
  exactly orthogonal at those defaults.
* ``.. weightcond-presets::`` — every entry of :data:`weightcond.PRESETS`: formula,
  conditioners, options with defaults, reference.
* ``.. weightcond-methods::`` — the published methods and the cell of the design space where
  each sits; the preset column is looked up in :data:`weightcond.PRESETS` at build time.
* ``.. weightcond-cells::`` — every cell of the design space: each registered transform at
  each side and placement, with its conditioned weight, cost and published method.
* ``.. weightcond-benchmark-results:: PATH`` — the Markdown report written by
  ``benchmarks/run.py`` (``benchmarks/RESULTS.md``), rendered as reStructuredText
  (headings, paragraphs and pipe tables: the subset that file uses).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)


def _literal(text: str) -> str:
    return f"``{text}``" if text else ""


def _text(text: str) -> str:
    """Plain text safe inside reStructuredText (no accidental markup or references)."""
    text = re.sub(r"([\\*`|])", r"\\\1", text)
    return re.sub(r"(\w)_(?=\W|$)", r"\1\\_", text)


def _list_table(header: list[str], rows: list[list[str]], widths: str = "auto") -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [header, *rows]:
        for i, cell in enumerate(row):
            bullet = "   * - " if i == 0 else "     - "
            lines.append((bullet + cell).rstrip())
    return lines


class _Generated(SphinxDirective):
    has_content = False

    def lines(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        lines = StringList(self.lines(), source=self.get_source_info()[0])
        nested_parse_with_titles(self.state, lines, container, self.content_offset)
        return container.children


def _public_path(cls: type) -> str:
    import weightcond.transforms as transforms

    if getattr(transforms, cls.__name__, None) is cls:
        return f"weightcond.transforms.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _options(cls: type) -> list[tuple[str, Any]]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return [(p.name, p.default) for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


class TransformTable(_Generated):
    """The registered transforms."""

    def lines(self) -> list[str]:
        import weightcond as wc

        rows = []
        for name, cls in wc.TRANSFORMS.items():
            options = ", ".join(f"``{k}={v!r}``" for k, v in _options(cls)) or "—"
            if cls.norm_tied:
                orthogonal = "no (norm-tied diagonal)"
            else:
                orthogonal = "yes" if cls(8).is_orthogonal else "no"
            rows.append([_literal(name), f":class:`~{_public_path(cls)}`", options, orthogonal])
        return _list_table(["name", "class", "options (defaults)",
                            "exactly orthogonal at the defaults"], rows, "12 14 54 20")


class PresetTable(_Generated):
    """The registered presets."""

    def lines(self) -> list[str]:
        import weightcond as wc

        rows = []
        for name, preset in wc.PRESETS.items():
            parts = [f"{c.transform} ({c.placement}, {c.side})" for c in preset.conditioners]
            if preset.update:
                parts.insert(0, "update")
            options = ", ".join(f"``{k}={v!r}``" for k, v in preset.options().items()) or "—"
            source = _text(preset.reference) or "—"
            peer, differences = getattr(preset, "peer", ""), getattr(preset, "differences", "")
            if peer:
                source += f". PEFT peer: ``{peer}``"
            if differences:
                source += f". Differences: {_text(differences)}"
            rows.append([_literal(name), _literal(preset.formula),
                         "; ".join(parts) or "—", options, source])
        return _list_table(["preset", "formula", "registers", "options (defaults)",
                            "reference"], rows, "10 26 18 26 20")


# method, cell, formula (rst math), reference, the preset's name (None: none planned)
_METHODS = [
    ("LoRA", "update only", r":math:`W + sBA`", "Hu et al., 2021, arXiv 2106.09685", "lora"),
    ("DoRA", "``magnitude``, left, post",
     r":math:`\operatorname{diag}(m \oslash \|W+sBA\|_\text{row})(W+sBA)`",
     "Liu et al., 2024, arXiv 2402.09353", "dora"),
    ("Pre-Diag", "``diag``, left, pre", r":math:`\operatorname{diag}(d)\,W + sBA`",
     "Calibrating and Rotating, arXiv 2511.00051", "pre_diag"),
    ("SORA", "``diag``, left, pre + ``skew``, left, post",
     r":math:`Q\,(\operatorname{diag}(d)\,W + sBA)`, :math:`Q = \operatorname{map}(S)`",
     "Calibrating and Rotating, arXiv 2511.00051", "sora"),
    ("OFT", "``block``, right (no update)",
     r":math:`W\,\operatorname{blockdiag}(\operatorname{cayley}(S_i))`",
     "Qiu et al., 2023, arXiv 2306.07280", "oft"),
    ("BOFT", "``butterfly``, right, pre + ``diag``, left, post (no update)",
     r":math:`\operatorname{diag}(s)\,W \prod_i P_i B_i P_i^\top`",
     "Liu et al., 2024, arXiv 2311.06243", "boft"),
    ("HRA", "``householder``, right (no update)", r":math:`W\,H_1 \cdots H_k`",
     "Yuan et al., 2024, arXiv 2405.17484", "hra"),
    ("Givens (GOFT)", "``givens``, right (no update)", r":math:`W\,G_R \cdots G_1`",
     "Ma et al., 2024, arXiv 2404.04316", "goft"),
]


class MethodTable(_Generated):
    """Published methods, their cell, and whether a preset names them in this version."""

    def lines(self) -> list[str]:
        import weightcond as wc

        rows = []
        for method, cell, formula, reference, preset in _METHODS:
            if preset is not None and preset in wc.PRESETS:
                available = f"preset ``{preset}``"
            elif preset is not None:
                available = "as transforms (``register_conditioning``); preset coming"
            else:
                available = "as transforms (``register_conditioning``)"
            rows.append([method, cell, formula, available, reference])
        return _list_table(["method", "cell (transform, side, placement)", "W'",
                            "in this version", "reference"], rows, "10 22 26 20 22")


_CELL_FORMULAS = {
    ("left", "pre"): r"{q}\,W + \Delta W",
    ("left", "post"): r"{q}\,(W + \Delta W)",
    ("right", "pre"): r"W\,{q} + \Delta W",
    ("right", "post"): r"(W + \Delta W)\,{q}",
}


class CellTable(_Generated):
    """Every cell: each registered transform at each side and placement."""

    def lines(self) -> list[str]:
        import weightcond as wc

        rows = []
        # each transform's symbol, cost and published cells are attributes of its class
        for name, cls in wc.TRANSFORMS.items():
            for side in ("left", "right"):
                n = "out" if side == "left" else "in"
                for placement in ("pre", "post"):
                    formula = _CELL_FORMULAS[side, placement].format(q=cls.symbol)
                    per_token = cls.cost_per_token.replace("{n}", rf"\text{{{n}}}")
                    rows.append([_literal(name), f"{side}, {placement}",
                                 f":math:`W' = {formula}`", f":math:`{per_token}`",
                                 cls.published.get((side, placement), "")])
        return _list_table(["transform", "side, placement", "conditioned weight",
                            "extra cost per token", "published method"], rows,
                           "12 12 30 20 26")


_INLINE_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    """Markdown inline markup to reStructuredText (code spans; bold and italics are shared)."""
    text = text.replace("\\", "\\\\")
    return _INLINE_CODE.sub(lambda m: f"``{m.group(1)}``", text)


def _cells(line: str) -> list[str]:
    return [_inline(c.strip()) for c in line.strip().strip("|").split("|")]


def markdown_to_rst(markdown: str) -> list[str]:
    """The subset of Markdown that ``benchmarks/report.py`` writes."""
    out: list[str] = []
    underline = {2: "=", 3: "-", 4: "~"}
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"^(#+)\s+(.*)$", line)
        if heading:
            level = len(heading.group(1))
            if level > 1:  # the file's own title is the page's
                title = _inline(heading.group(2))
                out += ["", title, underline.get(level, "^") * len(title), ""]
            i += 1
            continue
        if line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            header = _cells(block[0])
            rows = [_cells(b) for b in block[2:]]  # block[1] is the |---| separator
            out += ["", *_list_table(header, rows), ""]
            continue
        out.append(_inline(line))
        i += 1
    return out


class BenchmarkResults(_Generated):
    """Render a results Markdown file (path relative to the docs source folder)."""

    required_arguments = 1

    def lines(self) -> list[str]:
        path = (Path(self.env.srcdir) / self.arguments[0]).resolve()
        self.env.note_dependency(str(path))
        return markdown_to_rst(path.read_text(encoding="utf-8"))


# -- references to canonical paths ----------------------------------------------------------
# The reference documents every public name where users import it (``weightcond.merge``,
# ``weightcond.transforms.Skew``), while docstrings and type hints name the defining module
# (``weightcond.placement.Conditioning.activation``, ``weightcond.transforms.skew.Skew``).
# autodoc's ``:canonical:`` aliases classes, not their members, so a reference to a canonical
# path (or to a name relative to the module/class it is written in) is mapped to the public
# one here. Nothing is silenced: a target that maps to no documented object still warns.

_PUBLIC_NAMESPACES = ("weightcond", "weightcond.transforms", "weightcond.interop")
_PUBLIC: list[tuple[str, str]] = []  # (canonical, public), longest canonical first


def _canonical_to_public() -> list[tuple[str, str]]:
    import importlib

    pairs = []
    for namespace in _PUBLIC_NAMESPACES:
        try:
            module = importlib.import_module(namespace)
        except ImportError:
            continue
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            canonical = f"{obj.__module__}.{obj.__qualname__}"
            public = f"{namespace}.{name}"
            if canonical != public:
                pairs.append((canonical, public))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _resolve_public(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    candidates = [target]
    module, cls = node.get("py:module"), node.get("py:class")
    if module and cls:
        candidates.append(f"{module}.{cls}.{target}")
    if module:
        candidates.append(f"{module}.{target}")
    domain = env.domains.python_domain
    for candidate in candidates:
        for canonical, public in _PUBLIC:
            if candidate == canonical or candidate.startswith(canonical + "."):
                new = public + candidate[len(canonical):]
                found = domain.resolve_xref(env, node.get("refdoc"), app.builder,
                                            node["reftype"], new, node, contnode)
                if found is not None:
                    return found
    return None


def _check_transform_pages(app: Sphinx) -> None:
    """One page per transform (issue 7): every transform the package registers needs
    ``docs/transforms/<name>.rst``. Transforms registered from outside the package (the
    ``shear`` example, user code) are exempt."""
    import weightcond as wc

    for name, cls in wc.TRANSFORMS.items():
        if cls.__module__.startswith("weightcond.") and \
                not (Path(app.srcdir) / "transforms" / f"{name}.rst").exists():
            logger.warning("transform %r (%s) has no page docs/transforms/%s.rst", name,
                           cls.__qualname__, name, type="weightcond", subtype="transform-page")


def setup(app: Sphinx) -> dict[str, Any]:
    _PUBLIC[:] = _canonical_to_public()
    app.connect("missing-reference", _resolve_public)
    app.connect("builder-inited", _check_transform_pages)
    app.add_directive("weightcond-transforms", TransformTable)
    app.add_directive("weightcond-presets", PresetTable)
    app.add_directive("weightcond-methods", MethodTable)
    app.add_directive("weightcond-cells", CellTable)
    app.add_directive("weightcond-benchmark-results", BenchmarkResults)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
