"""The README's settings reference lists every setting with its default and meaning, as
`swav_service.settings.Settings` declares them: a limit added in code and not documented
(or documented with another default) fails here."""

from __future__ import annotations

from pathlib import Path

from swav_service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def reference_rows() -> list[str]:
    return [
        f"| `SWAV_{name.upper()}` | {shown(field.default)} | {field.description or ''} |"
        for name, field in Settings.model_fields.items()
    ]


def test_the_readme_lists_every_setting_with_its_default() -> None:
    text = README.read_text()
    section = text[text.index("### Every setting") :]
    section = section[: section.index("\n## ")]
    listed = [line for line in section.splitlines() if line.startswith("| `SWAV_")]
    assert listed == reference_rows()
