"""Every repository file that the docs name exists: paths in Markdown files, docstrings and comments.

A path-like token is either a relative path with a ``/`` that ends in a known file extension
(``serving/batching.py``, ``docs/PERFORMANCE.md``, ``deploy/kubernetes/price.yaml``) or a bare
document name in capitals (``README.md``). It must name a file or folder tracked by git,
relative to the repository root or to the folder of the file that names it (bare document names
also under ``docs/``, where the documents live). Things that are not paths of this repository are
listed in ``NOT_REPO_PATHS``: files beside a development checkout (``../shared/``), outputs git
ignores (``runs/…``), paths inside other projects. Absolute paths (``/tmp/…``), URLs and placeholders
(``runs/<run>/…``, ``training/tasks/*.py``) are not path-like tokens at all.

No doc text promises work for later either: a milestone still to come, or a to-do/fix-me marker,
goes stale the day the work lands or is dropped, and the issue tracker is where open work lives.
``test_no_doc_text_promises_later_work`` scans the same doc text (and the comment lines of shell,
YAML, TOML and template files) for those markers (``STALE_MARKERS``).
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]

EXTENSIONS = ("py", "md", "yaml", "yml", "toml", "txt", "json", "sh", "js", "css", "html", "cfg", "ini", "csv",
              "lock", "log", "gz", "png", "onnx", "ts")
# a path: segments of name characters joined by "/", the last one ending in a known extension
PATH = re.compile(r"(?<![\w./~$@*{-])((?:\.{1,2}/)*[\w][\w.+-]*(?:/[\w][\w.+-]*)*/[\w.+-]*\.(?:"
                  + "|".join(EXTENSIONS) + r"))(?![\w/-])")
# a bare document name: capitals, as this repository and its neighbours name their documents
BARE_DOC = re.compile(r"(?<![\w./~$@*{-])([A-Z][A-Z0-9_]+\.md)(?![\w/-])")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")
# Promises of later work in doc text: a milestone to come (any case), or an upper-case work marker.
STALE_MARKERS = re.compile(r"(?i:\b(?:next|later|future|upcoming) milestone\b|\bcoming soon\b)|\b(?:TODO|FIXME|XXX)\b")
# Files whose comment lines (starting with '#') are doc text too; Markdown is doc text whole.
COMMENTED = (".sh", ".yaml", ".yml", ".toml", ".conf", ".cfg", ".j2")
COMMENTED_NAMES = ("dlbook", ".ci/run")

# Named in the docs on purpose, but not files of this repository (a token is allowed when it
# starts with one of these).
NOT_REPO_PATHS = (
    "../shared/",  # data and notes beside a development checkout, not in the repository
    "runs/",  # training runs, benchmark and load-test outputs: git-ignored
    "bentoml/", "_bentoml_sdk/",  # inside the installed BentoML distribution (its core and its SDK package)
    "env/python/", "env/docker/",  # inside a built Bento
    "dist/",  # inside the npm package chinese-poetry, where data/README.md says the poems come from
    "MODEL_CARD.md",  # written into each exported model's folder in the BentoML store
)


def tracked(pattern: str | None = None) -> list[str]:
    """Files in the checkout that git tracks or would track (new files not yet committed count too)."""
    args = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"] + ([pattern] if pattern else [])
    out = subprocess.run(args, cwd=REPO, capture_output=True, check=True).stdout.decode()
    return sorted({name for name in out.split("\0") if name and (REPO / name).is_file()})


def python_doc_text(source: str) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a Python source."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.append((body[0].lineno, body[0].value.value))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found.append((token.start[0], token.string))
    return found


def doc_text(name: str) -> list[tuple[int, str]]:
    text = (REPO / name).read_text(encoding="utf-8")
    if name.endswith(".py"):
        return python_doc_text(text)
    return list(enumerate(text.splitlines(), start=1))


def references(text: str) -> list[str]:
    """The path-like tokens of a piece of doc text (URLs left out)."""
    text = URL.sub(" ", text)
    return PATH.findall(text) + BARE_DOC.findall(text)


def resolves(token: str, named_in: str, files: set[str], folders: set[str]) -> bool:
    if token.startswith(NOT_REPO_PATHS):
        return True
    here = PurePosixPath(named_in).parent
    bases = [PurePosixPath("."), here] + ([PurePosixPath("docs")] if "/" not in token else [])
    for base in bases:
        parts: list[str] = []
        for part in (base / token).parts:
            if part == "..":
                if not parts:
                    break  # leaves the repository
                parts.pop()
            elif part != ".":
                parts.append(part)
        else:
            path = "/".join(parts)
            if path in files or path in folders:
                return True
    return False


def broken_references(names: list[str]) -> list[str]:
    files = set(tracked())
    folders = {str(parent) for name in files for parent in PurePosixPath(name).parents if str(parent) != "."}
    broken = []
    for name in names:
        for line, text in doc_text(name):
            for token in references(text):
                if not resolves(token, name, files, folders):
                    broken.append(f"{name}:{line}: {token}")
    return sorted(set(broken))


def test_every_repo_path_the_docs_name_exists() -> None:
    names = tracked("*.py") + tracked("*.md")
    assert len(names) > 50, names  # git sees the checkout
    broken = broken_references(names)
    assert broken == [], "docs name files that are not in the repository:\n" + "\n".join(broken)


def stale_markers(names: list[str]) -> list[str]:
    """``file:line: text`` of every doc text line that promises later work."""
    found = []
    for name in names:
        if name.endswith(".py") or name.endswith(".md"):
            chunks = doc_text(name)
        else:
            lines = (REPO / name).read_text(encoding="utf-8", errors="replace").splitlines()
            chunks = [(i, line) for i, line in enumerate(lines, start=1)
                      if line.lstrip().startswith(("#", "{#"))]
        for start, text in chunks:
            for offset, line in enumerate(text.splitlines()):
                if STALE_MARKERS.search(URL.sub(" ", line)):
                    found.append(f"{name}:{start + offset}: {line.strip()}")
    return found


def test_no_doc_text_promises_later_work() -> None:
    names = [n for n in tracked() if not n.startswith("data/")
             and (n.endswith((".py", ".md", *COMMENTED)) or n in COMMENTED_NAMES)]
    assert len(names) > 50 and "dlbook" in names, names
    stale = stale_markers(names)
    assert stale == [], "doc text promises later work (say what is true now; open work goes in an issue):\n" + \
        "\n".join(stale)


def test_a_stale_marker_is_reported_and_code_is_not() -> None:
    marker = "TO" + "DO"  # spelt in two pieces, so this file's own doc text stays clean
    source = (f'"""Services on ONNX Runtime (next Milestone)."""\n# {marker}: tidy\n'
              f'NAME = "{marker}"  # a string in code is not doc text\n# see https://example.org/{marker}\n')
    lines = [text for _, chunk in python_doc_text(source) for text in chunk.splitlines()
             if STALE_MARKERS.search(URL.sub(" ", text))]
    assert lines == ["Services on ONNX Runtime (next Milestone).", f"# {marker}: tidy"]
    assert not STALE_MARKERS.search("a todo list, the milestones so far, XXXL")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see `serving/batching.py` and [results](docs/RESULTS.md#lenet).", ["serving/batching.py", "docs/RESULTS.md"]),
        ("facts in STACK_NOTES.md, not README.md.", ["STACK_NOTES.md", "README.md"]),
        ("https://github.com/x/y/blob/main/serving/batching.py and ../shared/wheels/a.txt",
         ["../shared/wheels/a.txt"]),
        ("serving.batching, training/tasks/*.py, a/b, runs/<run>/metrics.json", []),
    ],
)
def test_path_like_tokens_are_found_and_urls_left_out(text: str, expected: list[str]) -> None:
    assert sorted(references(text)) == sorted(expected)


def test_a_bogus_path_in_a_docstring_is_reported(tmp_path: Path) -> None:
    files = set(tracked())
    folders = {str(parent) for name in files for parent in PurePosixPath(name).parents if str(parent) != "."}
    source = '"""Facts in serving/no_such_module.py and NO_SUCH_NOTES.md; see serving/batching.py."""\n# x\n'
    named = [token for _, text in python_doc_text(source) for token in references(text)]
    assert sorted(named) == ["NO_SUCH_NOTES.md", "serving/batching.py", "serving/no_such_module.py"]
    missing = [token for token in named if not resolves(token, "training/recipes.py", files, folders)]
    assert missing == ["serving/no_such_module.py", "NO_SUCH_NOTES.md"]
