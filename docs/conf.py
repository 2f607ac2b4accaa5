"""Sphinx configuration of the gnorm_jax documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors, broken
cross-references to gnorm_jax names included).

Two things are generated at build time, so nothing has to be kept in sync by hand:

* ``api.rst``: one autosummary table per group of ``gnorm_jax.__all__``, in the order and
  under the comments of ``__all__`` in ``gnorm_jax/__init__.py``; a new public name is in the
  API reference at the next build (``tests/test_docs.py`` checks it).
* ``notebooks/``: copies of the repository's ``notebooks/*.ipynb`` (committed without
  outputs), executed by MyST-NB at their small CI size and cached in ``_build/.jupyter_cache``.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS)]

# The notebooks run small unless GNORM_NOTEBOOK_FULL=1; the docs always run them small.
os.environ["GNORM_NOTEBOOK_FULL"] = "0"
# Figures inline in the executed notebooks, even where MPLBACKEND=Agg is exported (CI).
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"

from api_reference import api_page  # noqa: E402

import gnorm_jax  # noqa: E402

project = "gnorm_jax"
author = "the gnorm_jax authors"
copyright = "2026, the gnorm_jax authors"
release = gnorm_jax.__version__
version = release

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
]

exclude_patterns = ["_build", "_templates", "**.ipynb_checkpoints"]
templates_path = ["_templates"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# Every reference to a gnorm_jax name must resolve. Names of other libraries (jax, optax,
# numpy, typing, ...) appear in signatures and docstrings; they stay plain text rather than
# links, so the build needs no network (no intersphinx inventories).
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(?!gnorm_jax\b).*\..*"),  # dotted names outside gnorm_jax: jax.Array, optax...
  (r"py:.*", r"Any|Callable|Sequence|Iterator|Mapping|NamedTuple|Schedule|PyTree"),
  (r"py:.*", r"int|float|bool|str|tuple|list|dict|None|object|type|complex"),
]

# Docstrings: Google style (Args/Returns/Raises/Examples/References).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as a field list, not duplicate attribute entries
napoleon_use_rtype = False
# A state's fields: the class signature gives their types, the descriptions their shapes.
napoleon_attr_annotations = False

autosummary_generate = True
autodoc_typehints = "signature"
# Signatures show these names, not the unions they stand for (ArrayLike is eight types).
autodoc_type_aliases = {
  "ArrayLike": "jax.typing.ArrayLike",
  "jax.typing.ArrayLike": "jax.typing.ArrayLike",
  "PyTree": "PyTree",
  "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
}
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
add_module_names = False

# MyST and the notebooks.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "cache"
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = f"gnorm_jax {release}"
html_theme_options = {
  "show_toc_level": 2,
  "navigation_with_keys": False,
}
html_static_path: list[str] = []


# ---------------------------------------------------------------------------
# The notebooks: copied from the repository (Sphinx reads sources under docs/ only).


def copy_notebooks() -> None:
  """Copies ``notebooks/*.ipynb`` into ``docs/notebooks/`` (the index lists them by glob)."""
  out = DOCS / "notebooks"
  out.mkdir(exist_ok=True)
  sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
  for src in sources:
    dst = out / src.name
    # Copy only what changed: an unchanged notebook keeps its mtime and is not re-read.
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
      shutil.copyfile(src, dst)
  for stale in set(out.glob("*.ipynb")) - {out / src.name for src in sources}:
    stale.unlink()


def write_if_changed(path: pathlib.Path, text: str) -> None:
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def remove_stale_api_pages() -> None:
  """Deletes generated ``_autosummary`` pages of names no longer in ``gnorm_jax.__all__``.

  autosummary writes a page per public name and never deletes one: after a name leaves the
  API, its old page would fail the import (and ``-W``) in a local rebuild.
  """
  for page in (DOCS / "_autosummary").glob("gnorm_jax.*.rst"):
    if page.stem.removeprefix("gnorm_jax.") not in gnorm_jax.__all__:
      page.unlink()


write_if_changed(DOCS / "api.rst", api_page())
remove_stale_api_pages()
copy_notebooks()


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields document themselves as "Alias for field number N": leave them out
  (the class signature lists the fields, the class docstring says what they hold)."""
  if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return None


def _show_type_aliases(app, what, name, obj, options, signature, return_annotation):
  """Writes an alias inside a union (``ArrayLike | None``) as its name.

  Sphinx writes an ``autodoc_type_aliases`` name as ``TypeAliasForwardRef('name')`` where it
  is one member of a union.
  """
  unwrap = lambda text: text and re.sub(r"TypeAliasForwardRef\('([^']*)'\)", r"\1", text)
  return unwrap(signature), unwrap(return_annotation)


def _title_attributes_section() -> None:
  """Titles the field list of a docstring's "Attributes:" section "Attributes".

  napoleon writes the section as ``:ivar name:`` fields (one list, no duplicate entries next to
  the class signature), which the Python domain titles "Variables"; a state's fields are
  attributes.
  """
  from sphinx.domains.python import PyObject

  for field in PyObject.doc_field_types:
    if field.name == "variable":
      field.label = "Attributes"


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  app.connect("autodoc-process-signature", _show_type_aliases)
  _title_attributes_section()
