"""The STARTING message of a job whose workers wait for resources (service/engine/rayjobs.py Placement)."""

from __future__ import annotations

from service.engine.rayjobs import Placement


def test_waiting_text_with_and_without_the_free_resources() -> None:
    assert Placement(False, {"CPU": 2.0}, {"CPU": 1.0}).waiting_text() == "waiting for resources: needs 2 CPU, 1 free"
    # Autoscaler v2 (`ray up` clusters): the dashboard does not report free resources; the wait is still said.
    assert Placement(False, {"CPU": 2.0}, {}).waiting_text() == "waiting for resources: needs 2 CPU"
    assert Placement(True, {}, {}).waiting_text() is None
