"""The README's configuration table says what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from worker.settings import SETTINGS, WorkerSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def configuration_rows() -> dict[str, str]:
    text = README.read_text()
    section = text.split("### Configuration (environment)", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    rows = configuration_rows()
    assert list(rows) == [s.env for s in SETTINGS], "the table's variables, in the code's order"
    for setting in SETTINGS:
        default = getattr(WorkerSettings(), setting.attribute)
        if not isinstance(default, int | float) or isinstance(default, bool):
            continue
        shown = re.match(r"`([^`]*)`", rows[setting.env])
        assert shown is not None, setting.env
        assert float(shown.group(1)) == float(default), setting.env
