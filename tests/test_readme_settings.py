"""The README's settings table against `Settings`: every variable it names exists, every setting
is in it, and each default it states is the default `Settings` has."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir

from pipeq.config.settings import Settings, known_variables

README = Path(__file__).resolve().parent.parent / "README.md"
# Defaults the table states in words; `Settings` has none (the value is derived or unset).
UNSET = {"", "none", "embedded", "the broker's Redis, else SQLite"}


def table() -> dict[str, str]:
    """variable -> default as the README's Configuration table states it."""
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`PIPEQ_"):
            continue
        for name in re.findall(r"`(PIPEQ_\w+)`", cells[0]):
            rows[name] = cells[1]
    return rows


def field_of(variable: str) -> str:
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", [f"PIPEQ_{name.upper()}"])
        if variable in choices:
            return name
    raise AssertionError(f"README names {variable}, which Settings does not read")


def matches(stated: str, default: Any) -> bool:
    stated = stated.strip("`")
    if stated in UNSET or "×" in stated:
        return default in (None, [])
    if isinstance(default, bool):
        return stated == str(default).lower()
    if isinstance(default, int | float):
        return float(stated) == default
    if "platformdirs" in stated:
        return bool(Path(default).resolve() == Path(user_data_dir("pipeq")).resolve())
    if isinstance(default, Path):
        return str(default).endswith(stated)
    return bool(stated == str(default))


def test_every_setting_is_in_the_table() -> None:
    named = {field_of(variable) for variable in table()}
    assert set(Settings.model_fields) - named == set()
    assert set(table()) <= set(known_variables())


def test_each_stated_default_is_the_real_one() -> None:
    wrong = {}
    for variable, stated in table().items():
        field = Settings.model_fields[field_of(variable)]
        default = field.get_default(call_default_factory=True)
        if not matches(stated, default):
            wrong[variable] = (stated, default)
    assert wrong == {}
