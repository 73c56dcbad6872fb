"""Generated config docs: the reference and the sample come from the schema and match docs/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import FIELDS
from broker.config_docs import reference_markdown, sample_yaml
from broker.config_load import load_config
from broker.config_validate import Config

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_sample_yaml_loads_to_the_default_config(tmp_path: Path) -> None:
    """The commented sample, as generated, is a valid config equal to Config()."""
    path = tmp_path / "config.yaml"
    path.write_text(sample_yaml(), encoding="utf-8")
    assert load_config(path, {}) == Config()


def test_sample_yaml_shows_each_key_with_its_description() -> None:
    """Every key appears once, under a comment that starts its description."""
    sample = sample_yaml()
    for field in FIELDS:
        assert sample.count(f"\n{field.name}: ") == 1
        assert f"# {field.description.split()[0]}" in sample


def test_reference_has_one_table_row_per_key_and_explains_overrides() -> None:
    """The Markdown table lists every key; the text covers durations and the environment."""
    reference = reference_markdown()
    assert "| key | type | default | description | example |" in reference
    for field in FIELDS:
        assert reference.count(f"\n| `{field.name}` |") == 1
    assert "## Durations" in reference
    assert "COMPUTE_BROKER_<KEY>" in reference


@pytest.mark.parametrize(
    ("name", "generate", "command"),
    [
        ("config.md", reference_markdown, "config-reference"),
        ("sample-config.yaml", sample_yaml, "sample-config"),
    ],
)
def test_generated_docs_are_up_to_date(name: str, generate: Any, command: str) -> None:
    """docs/ holds exactly what the schema generates (no drift)."""
    written = (DOCS / name).read_text(encoding="utf-8")
    assert written == generate(), (
        f"docs/{name} is out of date with broker/config.py; regenerate it with "
        f"`compute-broker {command} > docs/{name}`"
    )
