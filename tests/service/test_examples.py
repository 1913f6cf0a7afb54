"""Every example spec in examples/ validates, through the same path the API and CLI use."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.api.schemas import resolve_body

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates(path: Path) -> None:
    spec = resolve_body(yaml.safe_load(path.read_text()))
    assert spec.optim.epochs >= 1


def test_there_are_examples() -> None:
    assert {"debug.yaml", "paper.yaml"} <= {p.name for p in EXAMPLES}
