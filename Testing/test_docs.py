"""The documents a reader starts from stay short and their links lead somewhere: README.md <= 8 KB, BENCHMARKS.md
<= 15 KB, every relative link in README.md, BENCHMARKS.md, CONTRIBUTING.md and docs/**/*.md names a file or
folder of this repository, and no heading speaks of the project's issue tracker ("issue 12")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 8 * 1024
BENCHMARKS_MAX_BYTES = 15 * 1024
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\s*\d", re.IGNORECASE)


def documents() -> List[Path]:
    docs = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CONTRIBUTING.md"]
    return docs + sorted((ROOT / "docs").rglob("*.md"))


def prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(line number, line) outside fenced code blocks: a ``# comment`` in a bash block is not a heading."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            yield number, line


def without_code(line: str) -> str:
    return re.sub(r"`[^`]*`", "``", line)  # a link or a number inside inline code is not one


def relative_links(text: str) -> Iterator[Tuple[int, str]]:
    """Links to files of the repository and to anchors of the same page (as ``#anchor``)."""
    for number, line in prose_lines(text):
        for match in LINK.finditer(without_code(line)):
            target = match.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # not https:, mailto:
                yield number, target


def anchors(text: str) -> List[str]:
    """The anchors of a Markdown file's headings as GitHub makes them: lower case, punctuation dropped, spaces
    to hyphens; ``-1``, ``-2`` … after a repeat."""
    seen: List[str] = []
    for _, line in prose_lines(text):
        heading = re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            repeats = sum(1 for s in seen if s == slug or re.fullmatch(re.escape(slug) + r"-\d+", s))
            seen.append(f"{slug}-{repeats}" if repeats else slug)
    return seen


def broken_links(doc: Path, root: Path = ROOT) -> List[str]:
    """``file:line: target`` of every relative link whose file is missing or lies outside ``root``, or whose
    ``#anchor`` names no heading of the Markdown file it points to."""
    broken = []
    for number, target in relative_links(doc.read_text(encoding="utf-8")):
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc.resolve()
        if not path.exists() or root.resolve() not in (path, *path.parents):
            broken.append(f"{doc.relative_to(root)}:{number}: {target}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{doc.relative_to(root)}:{number}: {target}")
    return broken


def issue_headings(doc: Path, root: Path = ROOT) -> List[str]:
    return [f"{doc.relative_to(root)}:{number}: {line}" for number, line in prose_lines(doc.read_text(encoding="utf-8"))
            if line.lstrip().startswith("#") and ISSUE_NUMBER.search(without_code(line))]


def test_readme_and_benchmarks_stay_short():
    assert (ROOT / "README.md").stat().st_size <= README_MAX_BYTES, "README.md is over 8 KB: move depth into docs/"
    assert (ROOT / "BENCHMARKS.md").stat().st_size <= BENCHMARKS_MAX_BYTES, (
        "BENCHMARKS.md is over 15 KB: move the study's prose and tables into docs/benchmarks/")


def test_the_readme_keeps_its_two_marked_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("demo-command", "test-command"):
        block = re.search(rf"<!-- {name} -->\n```bash\n(.+)\n```\n<!-- /{name} -->", readme)
        assert block and block.group(1).startswith("python3 -m venv .venv && "), name


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_an_existing_file(doc):
    assert doc.exists(), f"{doc.relative_to(ROOT)} is missing"
    assert broken_links(doc) == []


def reachable_from(start: Path) -> set:
    """Every file of the repository reached from ``start`` by following relative links through Markdown files."""
    reachable, todo = set(), [start]
    while todo:
        doc = todo.pop()
        for _, target in relative_links(doc.read_text(encoding="utf-8")):
            path = (doc.parent / target.partition("#")[0]).resolve()
            if path.is_file() and path not in reachable:
                reachable.add(path)
                if path.suffix == ".md":
                    todo.append(path)
    return reachable


def test_every_page_under_docs_is_reachable_from_the_readme():
    reachable = reachable_from(ROOT / "README.md")
    assert [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md")) if p.resolve() not in reachable] == []


def test_every_benchmark_table_and_plot_is_reachable_from_benchmarks_md():
    """BENCHMARKS.md summarises; the numbers live in the tables and plots the scripts write to bench/results/ and
    in the study pages: each must be reachable from BENCHMARKS.md by following links."""
    reachable = reachable_from(ROOT / "BENCHMARKS.md")
    results = ROOT / "bench" / "results"
    wanted = sorted(results.glob("*.md")) + sorted(results.glob("*.png")) + sorted((ROOT / "docs" / "benchmarks").glob("*.md"))
    assert [str(p.relative_to(ROOT)) for p in wanted if p.resolve() not in reachable] == []


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_heading_names_an_issue_number(doc):
    assert issue_headings(doc) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The link and heading checks fail on a broken link and an issue heading (and pass code blocks by)."""
    (tmp_path / "outside.md").write_text("# Outside\n")
    tmp_path = tmp_path / "repo"
    tmp_path.mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("# Real\n")
    doc = tmp_path / "docs" / "a.md"
    doc.write_text("# Speed (issue 17)\n\n[ok](real.md#real) [web](https://example.org) [gone](missing.md)\n"
                   "![img](../nowhere.png) [up](../../outside.md) [no such part](real.md#unreal) [here](#issues-with-files)\n"
                   "\n```bash\n# issue 12's check\n[x](nope.md)\n```\n`[code](nope.md)`\n## Issues with `large` files\n")
    assert broken_links(doc, tmp_path) == ["docs/a.md:3: missing.md", "docs/a.md:4: ../nowhere.png",
                                           "docs/a.md:4: ../../outside.md", "docs/a.md:4: real.md#unreal",
                                           "docs/a.md:4: #issues-with-files"]
    assert anchors(doc.read_text()) == ["speed-issue-17", "issues-with-large-files"]
    assert issue_headings(doc, tmp_path) == ["docs/a.md:1: # Speed (issue 17)"]
