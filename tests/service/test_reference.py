"""The paper beside every run: the authors' notebook's test accuracy as a reference (service/api/reference.py),
in the job view, the job page and curves.png (over a fake Ray, as test_ui.py)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from service.api import reference
from tests.service.conftest import Api
from tests.service.test_ui import login, rows
from trainer.contract import EpochMetrics
from trainer.spec import resolve


def epoch(e: int, val: float, test: float | None = None) -> EpochMetrics:
    return EpochMetrics.model_validate({**rows(range(e, e + 1))[0], "val_acc": val, "test_acc": test})


def test_the_reference_is_for_runs_of_the_papers_network_only():
    for preset in ("paper", "notebook", "fast"):
        assert reference.applies_to(resolve(preset)) and reference.applies_to(resolve(preset).model_dump(mode="json"))
    assert not reference.applies_to(resolve("debug"))  # another width: another network
    assert not reference.applies_to(resolve("paper", {"model.dropout": 0.2}))
    search = resolve("paper", {"search": {"space": {"optim.lr": {"choice": [0.1, 0.05]}}}})
    assert not reference.applies_to(search)
    assert reference.reference_view(resolve("debug"), []) is None


def test_standing_at_the_latest_epoch_with_a_reference_point_on_test_accuracy_else_val():
    # epoch 4 has no notebook point: compared at epoch 3 (test 0.651 vs 0.631)
    s = reference.standing([epoch(1, 0.4, 0.45), epoch(3, 0.6, 0.651), epoch(4, 0.7, 0.72)])
    assert s is not None and (s.epoch, s.metric, s.reference_acc) == (3, "test_acc", 0.631)
    assert s.delta_points == 2.0 and "ahead of" in s.text and "+2.0 points" in s.text
    s = reference.standing([epoch(5, 0.65)])  # no test split: the validation figure, and it says so
    assert s is not None and s.metric == "val_acc" and s.delta_points == -5.4 and "behind" in s.text
    assert s.text.startswith("epoch 5: val 65.0 %")
    assert reference.standing([epoch(4, 0.7, 0.7)]) is None  # nothing to compare with yet


def test_job_view_page_and_curves_png_show_the_reference(api: Api) -> None:
    job_id = api.post({"preset": "paper", "overrides": {"optim.epochs": 10}}).json()["id"]
    debug_id = api.post({"preset": "debug", "overrides": {"optim.epochs": 3}}).json()["id"]
    api.reconcile()
    for jid in (job_id, debug_id):
        api.ray.set(f"{jid}-1", "RUNNING")
    api.reconcile()
    for jid in (job_id, debug_id):
        d = api.job_dir(jid)
        d.mkdir(parents=True, exist_ok=True)
        lines = [{**r, "test_acc": 0.5 + 0.05 * r["epoch"]} for r in rows(range(1, 4))]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    view = api.get(f"/v1/jobs/{job_id}").json()
    ref = view["reference"]
    assert ref["name"] == "authors' notebook" and ref["points"][0] == [1, 0.488]
    assert ref["standing"]["epoch"] == 3 and ref["standing"]["delta_points"] == 1.9  # 65.0 vs 63.1
    assert api.get(f"/v1/jobs/{debug_id}").json()["reference"] is None
    assert all(j["reference"] is None for j in api.get("/v1/jobs").json()["jobs"])  # lists stay cheap

    login(api)
    page = api.client.get(f"/ui/jobs/{job_id}").text
    assert 'id="reference"' in page and "+1.9 points, ahead of it" in page
    assert 'id="reference"' not in api.client.get(f"/ui/jobs/{debug_id}").text

    # curves.png: the same run's picture with the dashed grey reference drawn on the accuracy axes
    def img(jid: str) -> np.ndarray:
        r = api.get(f"/v1/jobs/{jid}/plots/curves.png")
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))

    grey = lambda im: (np.abs(im.astype(int) - [0x55, 0x55, 0x55]).sum(axis=2) < 30).sum()
    assert grey(img(job_id)) > grey(img(debug_id)) + 50
