"""The documentation site: every public name is in the API reference and documented, the
guide's Python examples run as written, and the docs build runs the notebooks small.

The site itself is built by ``sphinx-build -W -b html docs docs/_build/html`` (CI runs it after
the tests); these checks need no Sphinx.
"""

import importlib.util
import inspect
import json
import pathlib
import re

import pytest

import gnorm_jax

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
_spec = importlib.util.spec_from_file_location("api_reference", DOCS / "api_reference.py")
api_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(api_reference)

PAGES = sorted(DOCS.glob("*.md"))
EXAMPLES = [
  (page.stem, re.findall(r"```python\n(.*?)```", page.read_text(), re.S)) for page in PAGES
]
EXAMPLES = [(page, blocks) for page, blocks in EXAMPLES if blocks]


def autosummary_entries(page: str) -> list[str]:
  """The names listed in the autosummary tables of an .rst page."""
  return re.findall(r"^   (\w+)$", page, re.M)


def test_api_reference_lists_every_public_name_once():
  entries = autosummary_entries(api_reference.api_page())
  assert sorted(entries) == sorted(gnorm_jax.__all__)
  assert len(entries) == len(set(entries))


def test_api_groups_follow_the_comments_in_all():
  groups = dict(api_reference.api_groups())
  assert "Other public names" not in groups  # every name sits under a comment of __all__
  assert all(title[:1].isupper() for title in groups)


def test_a_public_name_missing_from_the_listing_is_still_documented(monkeypatch):
  monkeypatch.setattr(gnorm_jax, "__all__", [*gnorm_jax.__all__, "brand_new"])
  groups = api_reference.api_groups()
  assert groups[-1] == ("Other public names", ["brand_new"])
  assert "brand_new" in autosummary_entries(api_reference.api_page())


@pytest.mark.parametrize("name", gnorm_jax.__all__)
def test_public_name_has_its_own_docstring(name):
  obj = getattr(gnorm_jax, name)
  doc = inspect.getdoc(obj) or ""
  assert doc.strip(), f"gnorm_jax.{name} has no docstring"
  if inspect.isclass(obj):
    # Not the one NamedTuple or a dataclass writes for it ("Name(field, ...)").
    assert "__doc__" in vars(obj) and not doc.startswith(f"{name}("), name
  else:
    for section in ("Args:", "Returns:", ">>> "):  # house style: arguments, result, an example
      assert section in doc, f"gnorm_jax.{name}'s docstring has no {section!r}"


STATES = [name for name in gnorm_jax.__all__ if hasattr(getattr(gnorm_jax, name), "_fields")]


def attributes_section(doc: str) -> list[str]:
  """The names an "Attributes:" section of a Google-style docstring lists, in order."""
  section = doc.partition("\nAttributes:\n")[2]
  section = re.split(r"\n(?=\S)", section)[0]  # up to the next section
  return re.findall(r"^  (\w+):", section, re.M)


@pytest.mark.parametrize("name", STATES)
def test_namedtuple_docstring_lists_its_fields(name):
  """The site shows a state's fields from its docstring's "Attributes:" section (napoleon),
  one entry per field, in the field order."""
  cls = getattr(gnorm_jax, name)
  assert attributes_section(inspect.getdoc(cls)) == list(cls._fields), name


def test_every_guide_page_is_in_the_index():
  index = (DOCS / "index.md").read_text()
  for page in PAGES:
    if page.stem != "index":
      assert re.search(rf"^{page.stem}$", index, re.M), f"{page.name} is not in a toctree"


@pytest.mark.parametrize("page,blocks", EXAMPLES, ids=[page for page, _ in EXAMPLES])
def test_guide_examples_run(page, blocks):
  namespace = {}
  for i, code in enumerate(blocks):
    exec(compile(code, f"docs/{page}.md, example {i + 1}", "exec"), namespace)


@pytest.mark.parametrize(
  "notebook", sorted((DOCS.parent / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem
)
def test_notebooks_run_small_in_the_docs_build(notebook):
  """conf.py sets GNORM_NOTEBOOK_FULL=0: each notebook must read it, and be committed without
  outputs (the docs build executes it)."""
  cells = json.loads(notebook.read_text())["cells"]
  code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
  assert 'os.environ.get("GNORM_NOTEBOOK_FULL")' in code
  assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code")
  assert 'os.environ["GNORM_NOTEBOOK_FULL"] = "0"' in (DOCS / "conf.py").read_text()
