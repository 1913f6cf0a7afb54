"""YAML from users (the dashboard's submit form, `trainctl submit FILE`), parsed so that a few hundred bytes
cannot become gigabytes: aliases are refused (a "billion laughs" document nests aliases of aliases, and
whatever walks the result — validation, JSON, an error message — expands it), and so is nesting deeper
than a spec ever needs (the composer recurses: a deep enough document is a RecursionError, not a 4xx).
A spec needs neither; everything else is PyYAML's SafeLoader (plain data, no Python objects)."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.error import Mark
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent

MAX_DEPTH = 20  # a spec's deepest path (search.space.<path>.choice) is 5 levels


class _UserLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        mark = event.start_mark if isinstance(event.start_mark, Mark) else None
        if isinstance(event, AliasEvent):
            raise ComposerError(None, None, "YAML aliases (*name) are not accepted here: write the value out", mark)
        if isinstance(event, (ScalarEvent, CollectionStartEvent)) and event.anchor is not None:
            raise ComposerError(None, None, "YAML anchors (&name) are not accepted here: write the value out", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load(text: str) -> Any:
    """The document in `text` as plain data; raises yaml.YAMLError (with a problem_mark where it can) for
    invalid YAML, aliases, anchors, too deep nesting, or a number too long to convert."""
    loader = _UserLoader(text)
    try:
        return loader.get_single_data()
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits (Python's int() limit)
        raise yaml.YAMLError(f"a value cannot be converted: {str(exc)[:100]}") from None
    finally:
        loader.dispose()
