"""The Python examples of the README and of the docs site run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [
    (f"{page.relative_to(ROOT).as_posix()} python block {index}", block)
    for page in PAGES
    for index, block in enumerate(
        re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    )
]


def test_the_readme_has_python_examples() -> None:
    assert any(name.startswith("README.md") for name, _ in BLOCKS), "README.md lost its examples"


@pytest.mark.parametrize(("name", "block"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_a_python_example_runs(name: str, block: str, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(block, name, "exec"), {})
    if "persist" in block:
        assert "persist 2 " in capsys.readouterr().out
