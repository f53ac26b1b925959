"""Sphinx configuration of fastoptim's documentation.

Build: ``pip install '.[docs,torch]' && sphinx-build -W --keep-going -n docs docs/_build/html``.
Nothing is downloaded at build time (no intersphinx): references to NumPy/torch types are
left unresolved on purpose (``nitpick_ignore_regex``).

- API pages: one line per module in ``api.rst`` (autosummary writes ``docs/api/*.rst`` from
  ``_templates/autosummary/module.rst``).
- Guide pages come from the README: a page whose source is ``<!-- readme: Section -->`` gets
  that ``## Section`` of README.md (headings one level up, README links to other sections
  pointed at their pages, image paths made relative to docs/), so the two never drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import fastoptim

ROOT = Path(__file__).resolve().parent.parent

project = "fastoptim"
author = "fastoptim contributors"
copyright = "fastoptim contributors"
release = fastoptim.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",  # formulas rendered by the reader's browser
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
templates_path = ["_templates"]

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# fastoptim.torch is documented by importing it: torch must be installed ('.[docs,torch]').
myst_heading_anchors = 3

# Cross-references `-n` cannot resolve without downloading other projects' inventories.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(np|numpy|numpy\.typing|npt|torch|optim)\..*"),
    (r"py:.*", r"(ndarray|Tensor|ArrayLike|DTypeLike|NDArray)"),
    (r"py:.*", r"(os\.PathLike|PathLike|Path|Callable|Iterable|Iterator|Mapping|Sequence)"),
    (r"py:.*", r"(collections\.abc|typing|typing_extensions|pathlib|contextlib)\..*"),
    (r"py:.*", r"(Any|Union|Optional|Literal|ClassVar|Self|TypeVar)"),
    # fastoptim's private type aliases (Params, Grads...) and private modules or attributes,
    # which docstrings may mention but the reference does not document
    # Unqualified names in annotations are type aliases or typing names (Params, Value...):
    # autodoc qualifies real classes, so this cannot hide a broken reference to one.
    (r"py:class", r"[A-Z]\w*"),
    # TypeVars (one capital letter) qualified by their module, as autodoc writes them in
    # signatures: F in fastoptim.engine.definition.with_keyword_hints
    (r"py:class", r"fastoptim\.[\w.]*\.[A-Z]"),
    (r"py:.*", r"(fastoptim\.)?([\w.]*\.)?_\w+"),
]

html_theme = "furo"
html_title = f"fastoptim {release}"
html_static_path: list[str] = []

# ------------------------------------------------------------------ README sections as pages
_MARKER = re.compile(r"<!--\s*readme:\s*(.+?)\s*-->")


def _sections() -> dict[str, str]:
    """README.md's ``## `` sections: heading -> text (the heading line included)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    parts = re.split(r"^(?=## )", text, flags=re.M)
    return {p.splitlines()[0][3:].strip(): p for p in parts[1:]}


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.lower()).strip().replace(" ", "-")


def _pages(app: Any) -> dict[str, str]:
    """README section slug -> the docname of the page showing it."""
    pages = {}
    sections = _sections()
    for path in Path(app.srcdir).glob("*.md"):
        for name in _MARKER.findall(path.read_text(encoding="utf-8")):
            pages[_slug(name)] = path.stem
            for sub in re.findall(r"^###+ (.+)$", sections.get(name, ""), flags=re.M):
                pages[_slug(sub)] = path.stem  # its subsections' anchors too
    return pages


def _readme_sections(app: Any, docname: str, source: list[str]) -> None:
    if not _MARKER.search(source[0]):
        return
    sections, pages = _sections(), _pages(app)
    app.env.note_dependency(str(ROOT / "README.md"))

    def insert(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in sections:
            raise ValueError(f"{docname}: README.md has no section '## {name}'")
        text = sections[name]
        text = re.sub(r"^(#+)#", r"\1", text, flags=re.M)  # ## -> #, ### -> ## (not in code)
        text = text.replace("](docs/", "](")  # images live in docs/
        text = text.replace("](CONTRIBUTING.md)", "](contributing.md)")  # a page of its own

        def link(m: re.Match[str]) -> str:  # [Tour](#tour) -> the page that shows the Tour
            slug = m.group(1)
            if slug in pages and pages[slug] != docname:
                return f"]({pages[slug]}.md#{slug})"
            return m.group(0)

        return re.sub(r"\]\(#([\w-]+)\)", link, text)

    source[0] = _MARKER.sub(insert, source[0])


def setup(app: Any) -> None:
    app.connect("source-read", _readme_sections)
