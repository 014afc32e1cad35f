"""The repository stands alone: no tracked file points outside it, and doc citations resolve.

* No tracked file (`git ls-files`) names a path of the machine it was written on: the workplace's shared design notes
  and seeds, /work/..., a job directory, a home directory. Placeholder paths in examples (`/tmp/run`, `/path/to/...`,
  `$SCRATCH/run`, `gs://bucket/run`) are fine.
* Every `docs/<file>.md §N` citation in a tracked .py or .md file names a numbered heading that exists in that doc,
  and a bare `§N` inside a doc names one of its own headings.
* Every recipe config's module docstring cites docs/methods.md, not design notes outside the repository.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Paths that only exist on the machine a file was written on. An absolute path must start at a path boundary, so
# "https://example.org/work/x" or "repo/shared/x" do not count; "~/.cache/..." style user paths are not listed (no
# tracked file uses one, and they are not machine-specific).
OUTSIDE_PATHS = {
    "shared design notes or seeds": re.compile(r"shared/(?:design|seeds)\b"),
    "a sibling directory of the repository": re.compile(r"\.\./shared\b"),
    "an absolute /work/ path": re.compile(r"(?<![\w.~$}-])/work/"),
    "an absolute /shared/ path": re.compile(r"(?<![\w.~$}-])/shared/"),
    "a job directory": re.compile(r"/tmp/bash_jobs|bash_jobs\.\d"),
    "a home directory": re.compile(r"(?<![\w.~$}-])/(?:home|Users)/[A-Za-z_][\w.-]*/|(?<![\w.~$}-])/root/"),
}
# Design notes that live outside the repository: config docstrings cite docs/ instead.
DESIGN_NOTES = re.compile(r"\b(?:METHODS|PEERS|JAX_ANCHORS)\.md\b")

RECIPE_CONFIGS = ("dyme", "curr_reft", "clgrpo", "infi_mmr", "grpo", "sft", "demo")

# "docs/methods.md §2.1", "docs/methods.md §2, §3.4 and §6"
CITATION = re.compile(r"(docs/[\w./-]+?\.md)((?:(?:\s*,\s*|\s+and\s+|\s+)§\s?\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def read_text(path: str) -> str | None:
    """The file's text, or None for binary or missing files (a tracked file deleted in the working tree)."""
    try:
        data = (ROOT / path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def outside_path_hits(text: str) -> list[tuple[int, str, str]]:
    hits = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for kind, pattern in OUTSIDE_PATHS.items():
            if pattern.search(line):
                hits.append((lineno, kind, line.strip()))
    return hits


def doc_sections(doc: str) -> set[str]:
    return set(HEADING.findall(doc))


def citations(text: str) -> list[tuple[str, str]]:
    """(doc path, section number) for every `docs/....md §N` citation in `text`."""
    return [
        (m.group(1), section.rstrip(".")) for m in CITATION.finditer(text) for section in SECTION.findall(m.group(2))
    ]


def test_the_patterns_catch_leaks_and_spare_placeholders():
    leaks = [
        "Spec: " + "/work" + "/shared/design/METHODS.md §2.",
        "see PEERS.md and ../" + "shared/x",
        "--workdir " + "/shared" + "/run",
        "/tmp/" + "bash_jobs.1000/3/stdout",
        "/home" + "/alice/jaxvlm",
        "cd " + "/root" + "/repo",
    ]
    fine = [
        "--workdir /tmp/jaxvlm-demo",
        "/path/to/Qwen2.5-VL-3B-Instruct",
        "--workdir $SCRATCH/run",
        "gs://bucket/run",
        "https://example.org/work/x",
        "configs/<recipe>.py",
        "src/shared/utils.py",
    ]
    assert all(outside_path_hits(text) for text in leaks)
    assert not any(outside_path_hits(text) for text in fine)
    assert citations("Spec: docs/methods.md §2.1; docs/methods.md §3, §3.4 and §6.") == [
        ("docs/methods.md", "2.1"),
        ("docs/methods.md", "3"),
        ("docs/methods.md", "3.4"),
        ("docs/methods.md", "6"),
    ]
    assert doc_sections("# Title\n## 1. Core\n### 1.2 Ratio\n## Sources\n") == {"1", "1.2"}


def test_no_tracked_file_names_a_path_outside_the_repository():
    problems = []
    for path in tracked_files():
        if path == THIS_FILE:  # holds the patterns (and examples of leaks) itself
            continue
        text = read_text(path)
        if text is not None:
            problems += [f"{path}:{lineno}: {kind}: {line}" for lineno, kind, line in outside_path_hits(text)]
    assert not problems, "paths outside the repository:\n" + "\n".join(problems)


def test_doc_citations_name_existing_sections():
    problems, cited = [], 0
    for path in tracked_files():
        if not path.endswith((".py", ".md")) or path == THIS_FILE:
            continue
        text = read_text(path)
        if text is None:
            continue
        for doc, section in citations(text):
            cited += 1
            doc_text = read_text(doc)
            if doc_text is None:
                problems.append(f"{path}: cites {doc}, which does not exist")
            elif section not in doc_sections(doc_text):
                problems.append(f"{path}: cites {doc} §{section}, which has no such section heading")
    assert not problems, "\n".join(problems)
    assert cited > 0, "no docs/... § citation found: the pattern no longer matches what the configs write"


def test_docs_internal_section_references_resolve():
    """A bare `§N` inside docs/<file>.md refers to that file's own numbered headings."""
    problems = []
    for path in tracked_files():
        if not (path.startswith("docs/") and path.endswith(".md")) or (text := read_text(path)) is None:
            continue
        sections = doc_sections(text)
        for lineno, line in enumerate(text.splitlines(), 1):
            for section in SECTION.findall(CITATION.sub("", line)):
                if section.rstrip(".") not in sections:
                    problems.append(f"{path}:{lineno}: §{section} is not a section of this file")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_recipe_config_docstring_cites_the_methods_doc(name):
    source = (ROOT / "configs" / f"{name}.py").read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(source)) or ""
    assert "docs/methods.md" in docstring, f"configs/{name}.py: the module docstring should cite docs/methods.md"
    notes = DESIGN_NOTES.findall(docstring)
    assert not notes, f"configs/{name}.py: the module docstring cites design notes outside the repository: {notes}"


def test_no_file_cites_the_outside_design_notes():
    """Code, configs, docs and tests cite docs/ (or a paper, a repository, a datasheet), never the design notes that
    live outside the repository, by name ("METHODS §3.4") or by file ("PEERS.md")."""
    outside = re.compile(r"\b(?:METHODS|PEERS|JAX_ANCHORS)(?:\.md\b|\s+§|:)")
    problems = []
    for path in tracked_files():
        if path == "tests/test_repository.py" or (text := read_text(path)) is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if outside.search(line):
                problems.append(f"{path}:{lineno}: {line.strip()[:100]}")
    assert not problems, "\n".join(problems)


def test_the_longest_first_test_order_names_existing_files():
    """conftest.LONGEST_FIRST orders the test files for CI's two workers; a renamed file would silently drop out."""
    from conftest import LONGEST_FIRST

    missing = [name for name in LONGEST_FIRST if not (ROOT / "tests" / name).is_file()]
    assert not missing and len(set(LONGEST_FIRST)) == len(LONGEST_FIRST), missing
