"""The documents say what the code does, and their links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serving.settings import TABLE, markdown_table, with_tables
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = ROOT / "docs" / "configuration.md"
SKIPPED = {".git", ".venv", ".tools", "node_modules", ".mypy_cache", ".ruff_cache"}


def documents() -> list[Path]:
    """Every Markdown file of the project (not those of installed packages)."""
    return sorted(
        path
        for path in ROOT.rglob("*.md")
        if not SKIPPED.intersection(path.relative_to(ROOT).parts)
        and not any(part.endswith(".egg-info") for part in path.parts)
    )


def test_the_configuration_tables_are_written_from_the_declarations() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    assert with_tables(text) == text, (
        "docs/configuration.md is stale: run .venv/bin/python -m serving.settings "
        "docs/configuration.md"
    )
    tables = [found["cls"] for found in TABLE.finditer(text)]
    assert tables == [
        "worker.settings:WorkerSettings",
        "gateway.settings:GatewaySettings",
        "publisher.settings:PublisherSettings",
    ]


def test_the_worker_table_shows_the_defaults_the_code_has() -> None:
    rows = {row.split("`")[1]: row for row in markdown_table(WorkerSettings).splitlines()[2:]}
    assert "| `PULLER_SHUTDOWN_GRACE` | `20` |" in rows["PULLER_SHUTDOWN_GRACE"]
    assert "| `PULLER_NODE_NAME` | the host name |" in rows["PULLER_NODE_NAME"]
    assert "| `PULLER_REQUIRE_DIGEST` | `false` |" in rows["PULLER_REQUIRE_DIGEST"]
    assert "`PULLER_AMQP_URL_FILE`: a file holding it" in rows["PULLER_AMQP_URL"]
    assert rows["PULLER_DISK_HIGH_WATER"].endswith("; 1 to 99 |")


def test_the_readme_is_one_short_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to docs/"


FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.MULTILINE)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a document's headings."""
    found: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        words = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", words.lower()).replace(" ", "-")
        anchor, count = slug, 0
        while anchor in found:
            count += 1
            anchor = f"{slug}-{count}"
        found.add(anchor)
    return found


def broken_links(document: Path) -> list[str]:
    text = document.read_text(encoding="utf-8")
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        destination = (document.parent / path).resolve() if path else document
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif (
            fragment
            and destination.suffix == ".md"
            and fragment not in anchors(destination.read_text(encoding="utf-8"))
        ):
            broken.append(f"{target}: no such heading")
    return broken


def test_the_link_check_sees_a_broken_file_and_a_broken_heading(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text(
        "# A page\n\n## The roster: which nodes exist\n\n"
        "[ok](#the-roster-which-nodes-exist) [ok](b.md#a-sessions-pull) [gone](c.md) "
        "[gone](b.md#nothing) `[code](x.md)`\n\n```\n[fenced](y.md)\n```\n"
    )
    (tmp_path / "b.md").write_text("# B\n\n## A session's pull\n")
    assert broken_links(tmp_path / "a.md") == [
        "c.md: no such file",
        "b.md#nothing: no such heading",
    ]


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(document: Path) -> None:
    assert broken_links(document) == []
