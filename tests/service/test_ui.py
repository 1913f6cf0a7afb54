"""The dashboard's server side over a fake Ray (the real browser runs in test_browser.py): sessions and
CSRF, the pages, the SSE stream, the PNG plots (decoded) and the per-epoch checkpoint download."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.ui.session import Sessions
from tests.service.conftest import Api


def rows(epochs: range) -> list[dict[str, Any]]:
    return [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "train_acc": 0.2 * e,
            "val_loss": 2.2 / e,
            "val_acc": 0.15 * e,
            "lr": 0.05 / e,
            "images_per_s": 100.0 + e,
            "epoch_seconds": 3.0,
            "time": 1e9 + e,
            "resumed": False,
            "node_ids": ["n1"],
        }
        for e in epochs
    ]


def write_metrics(api: Api, job_id: str, epochs: range) -> None:
    d = api.job_dir(job_id)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(epochs)))


def running_job(api: Api, epochs: int = 4) -> str:
    job_id = api.post({"preset": "debug", "overrides": {"optim.epochs": epochs}}).json()["id"]
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    api.reconcile()
    return job_id


def login(api: Api, token: str | None = None, **headers: str) -> Any:
    return api.client.post(
        "/ui/login",
        content=f"token={token or api.token}&next=/ui/",
        headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
        follow_redirects=False,
    )


def csrf_of(html: str) -> str:
    marker = '<meta name="csrf-token" content="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


# --- sessions -----------------------------------------------------------------------------------------------


def test_session_cookie_is_signed_and_expires() -> None:
    s = Sessions(b"k" * 64, ttl_s=60)
    cookie = s.issue("abc", now=1000.0)
    assert s.token_hash(cookie, now=1030.0) == "abc"
    assert s.token_hash(cookie, now=1061.0) is None  # expired
    h, exp, sig = cookie.split(".")
    assert s.token_hash(f"{h}.{int(exp) + 3600}.{sig}", now=1030.0) is None  # extended by hand
    assert s.token_hash(f"other.{exp}.{sig}", now=1030.0) is None
    assert Sessions(b"x" * 64).token_hash(cookie, now=1030.0) is None  # another key
    assert s.csrf_ok(cookie, s.csrf_token(cookie)) and not s.csrf_ok(cookie, "") and not s.csrf_ok(cookie, None)


def test_login_sets_a_strict_httponly_cookie_and_pages_need_it(api: Api) -> None:
    r = api.client.get("/ui/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=/ui/")
    bad = login(api, "tc_wrong")
    assert bad.status_code == 401 and "invalid token" in bad.text and "set-cookie" not in bad.headers
    ok = login(api)
    assert ok.status_code == 303 and ok.headers["location"] == "/ui/"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/" in cookie
    assert api.token not in cookie  # the cookie never carries the token itself
    page = api.client.get("/ui/")
    assert page.status_code == 200 and 'id="jobs-table"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"] and page.headers["x-frame-options"] == "DENY"
    assert api.client.get("/ui/static/app.js").status_code == 200
    assert api.client.get("/ui/submit").status_code == 200


def test_login_from_another_site_and_open_redirects_are_refused(api: Api) -> None:
    assert login(api, Origin="https://evil.example").status_code == 403
    r = api.client.post(
        "/ui/login",
        content=f"token={api.token}&next=//evil.example/x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/"


def test_cookie_requests_need_the_csrf_token_for_posts(api: Api) -> None:
    job_id = running_job(api)
    login(api)
    html = api.client.get(f"/ui/jobs/{job_id}").text
    token = csrf_of(html)
    assert token and f'data-job-id="{job_id}"' in html
    assert api.client.get("/v1/jobs").json()["total"] == 1  # GETs with the cookie alone
    r = api.client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    # the bearer API is unchanged: no CSRF token needed without the cookie
    api.client.cookies.clear()
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers()).status_code == 200
    assert api.client.get("/v1/jobs").status_code == 401


def test_logout_clears_the_cookie_only_with_the_csrf_token(api: Api) -> None:
    login(api)
    token = csrf_of(api.client.get("/ui/").text)
    assert (
        api.client.post(
            "/ui/logout", content="csrf=nope", headers={"Content-Type": "application/x-www-form-urlencoded"}
        ).status_code
        == 403
    )
    r = api.client.post(
        "/ui/logout",
        content=f"csrf={token}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert 'trainctl_session=""' in r.headers["set-cookie"] or "Max-Age=0" in r.headers["set-cookie"]
    assert api.client.get("/ui/", follow_redirects=False).status_code == 303


def test_jobs_table_and_submit_form(api: Api) -> None:
    login(api)
    token = csrf_of(api.client.get("/ui/submit").text)
    r = api.client.post(
        "/ui/api/submit",
        json={"preset": "debug", "overrides_yaml": "optim.epochs: 0\n"},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "optim.epochs"
    r = api.client.post(
        "/ui/api/submit",
        json={"preset": "debug", "overrides_yaml": "optim: [unclosed"},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "overrides"
    assert "line 1" in r.json()["error"]["details"][0]["message"]
    r = api.client.post("/ui/api/submit", json={"preset": "debug", "overrides_yaml": "optim.epochs: 4"})
    assert r.status_code == 403  # no CSRF token
    r = api.client.post(
        "/ui/api/submit", json={"preset": "debug", "overrides_yaml": "optim.epochs: 4"}, headers={"X-CSRF-Token": token}
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    api.reconcile()
    api.ray.set(f"{job_id}-1", "RUNNING")
    write_metrics(api, job_id, range(1, 3))
    api.reconcile()
    table = api.client.get("/ui/api/jobs").json()
    row = table["jobs"][0]
    assert row["id"] == job_id and row["state"] == "RUNNING" and (row["epoch"], row["epochs"]) == (2, 4)
    assert row["eta_seconds"] == 6.0 and row["best_val_acc"] == pytest.approx(0.3)
    assert row["device"] == "2 × CPU" and row["test_acc"] is None
    assert api.client.get("/ui/api/jobs", params={"state": "succeeded"}).json()["jobs"] == []


# --- SSE ----------------------------------------------------------------------------------------------------


def read_events(api: Api, job_id: str) -> list[tuple[str, Any]]:
    events, name = [], None
    with api.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.headers()) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_events_stream_epochs_and_state_until_the_end(make_api) -> None:
    api = make_api(events_poll_s=0.05)
    job_id = running_job(api, epochs=3)
    write_metrics(api, job_id, range(1, 4))
    d = api.job_dir(job_id)
    (d / "summary.json").write_text(json.dumps({"state": "succeeded", "best_val_acc": 0.45, "epochs_completed": 3}))
    api.ray.set(f"{job_id}-1", "SUCCEEDED", exit_code=0)
    api.reconcile()
    events = read_events(api, job_id)
    names = [n for n, _ in events]
    assert names == ["epoch", "epoch", "epoch", "state", "end"], names
    assert [d["epoch"] for n, d in events if n == "epoch"] == [1, 2, 3]
    state = events[3][1]
    assert state["state"] == "SUCCEEDED" and state["progress"] == {"epoch": 3, "epochs": 3, "eta_seconds": 0.0}
    assert api.client.get(f"/v1/jobs/{job_id}/events").status_code == 401  # same auth as the API


def test_events_follow_a_running_job(make_api) -> None:
    """Epochs written while the stream is open arrive as they finish, then the end."""
    import threading
    import time

    api = make_api(events_poll_s=0.05)
    job_id = running_job(api, epochs=3)
    write_metrics(api, job_id, range(1, 2))

    def progress() -> None:
        time.sleep(0.5)
        write_metrics(api, job_id, range(1, 3))
        time.sleep(0.5)
        api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())

    t = threading.Thread(target=progress)
    t.start()
    events = read_events(api, job_id)
    t.join()
    epochs = [d["epoch"] for n, d in events if n == "epoch"]
    states = [(d["state"], d["progress"]["epoch"]) for n, d in events if n == "state"]
    assert epochs == [1, 2]
    assert states[0] == ("RUNNING", 1) and ("RUNNING", 2) in states and states[-1][0] == "CANCELLED"
    running2 = next(d for n, d in events if n == "state" and d["progress"]["epoch"] == 2)
    assert running2["best_val_acc"] == pytest.approx(0.3)  # from the epochs, not the store's (stale) value
    assert events[-1] == ("end", {"state": "CANCELLED"})


# --- plots --------------------------------------------------------------------------------------------------


def png(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png" and resp.content[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB"))


def test_plots_change_as_epochs_finish(api: Api) -> None:
    job_id = running_job(api, epochs=4)
    r = api.get(f"/v1/jobs/{job_id}/plots/curves.png")
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_metrics"
    write_metrics(api, job_id, range(1, 2))
    one = api.get(f"/v1/jobs/{job_id}/plots/curves.png")
    img1 = png(one)
    assert img1.shape == (420, 1100, 3) and len(np.unique(img1.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    write_metrics(api, job_id, range(1, 4))
    three = api.get(f"/v1/jobs/{job_id}/plots/curves.png")
    img3 = png(three)
    assert img3.shape == img1.shape and len(three.content) != len(one.content)
    assert (img3 != img1).any(axis=2).mean() > 0.01  # the curves moved
    # the train-loss colour (matplotlib C0, #1f77b4) covers more pixels with three points and two segments
    blue = lambda im: (np.abs(im.astype(int) - [0x1F, 0x77, 0xB4]).sum(axis=2) < 40).sum()
    assert blue(img3) > blue(img1)
    lr = png(api.get(f"/v1/jobs/{job_id}/plots/lr.png"))
    assert lr.shape == (360, 700, 3)
    r = api.get(f"/v1/jobs/{job_id}/plots/confusion.png")
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_confusion_matrix"
    matrix = np.eye(10, dtype=int) * 90 + 1
    (api.job_dir(job_id) / "confusion.json").write_text(
        json.dumps(
            {
                "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
                "matrix": matrix.tolist(),
                "split": "val",
                "accuracy": 0.9,
                "n": int(matrix.sum()),
            }
        )
    )
    conf = png(api.get(f"/v1/jobs/{job_id}/plots/confusion.png"))
    assert conf.shape == (700, 800, 3) and len(np.unique(conf.reshape(-1, 3), axis=0)) > 20
    assert api.get(f"/v1/jobs/{job_id}/plots/other.png").status_code == 422


def test_checkpoint_download_by_epoch(api: Api) -> None:
    job_id = running_job(api)
    d = api.job_dir(job_id)
    ckpt = d / job_id / "epoch_0001" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"abc" * 1000)
    sha = hashlib.sha256(b"abc" * 1000).hexdigest()
    (d / "manifest.json").write_text(
        json.dumps(
            {
                "checkpoints": [{"epoch": 1, "val_acc": 0.1, "uri": str(ckpt), "sha256": sha, "size": 3000}],
                "latest_epoch": 1,
            }
        )
    )
    r = api.get(f"/v1/jobs/{job_id}/checkpoints/1/file")
    assert r.status_code == 200 and r.headers["x-checkpoint-sha256"] == sha and r.content == b"abc" * 1000
    assert api.get(f"/v1/jobs/{job_id}/checkpoints/2/file").status_code == 404


def test_cli_plot_saves_the_pngs(api: Api, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`trainctl plot` against the real app (its TestClient transport): curves and lr now, confusion once
    the run wrote it."""
    from service.client import http
    from service.client.cli import common, main, models

    job_id = running_job(api)
    write_metrics(api, job_id, range(1, 3))
    monkeypatch.setattr(
        common,
        "client",
        lambda args, timeout=30, retry=True: http.TrainctlClient(
            "http://testserver", api.token, transport=api.client._transport
        ),
    )
    out = tmp_path / "plots"
    assert models.cmd_plot(main.build_parser().parse_args(["plot", job_id, "-o", str(out)])) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{job_id}-curves.png", f"{job_id}-lr.png"]
    assert "skipped confusion" in capsys.readouterr().err
    assert Image.open(out / f"{job_id}-curves.png").size == (1100, 420)
    with pytest.raises(common.CliError, match="unknown plot"):
        models.cmd_plot(main.build_parser().parse_args(["plot", job_id, "-o", str(out), "--only", "nope"]))


def test_search_page_lists_the_searched_parameters(api: Api) -> None:
    body = {
        "preset": "debug",
        "overrides": {
            "optim.epochs": 2,
            "search": {
                "space": {"optim.lr": {"loguniform": [0.01, 0.3]}, "optim.weight_decay": {"choice": [0.0005, 0.001]}},
                "num_samples": 2,
                "metric": "val_acc",
                "mode": "max",
            },
        },
    }
    job_id = api.post(body).json()["id"]
    login(api)
    html = api.client.get(f"/ui/jobs/{job_id}").text
    assert 'id="trials-table"' in html and 'data-search="true"' in html and 'id="chart-loss"' not in html
    assert 'data-key="config.optim.lr"' in html and 'data-param="optim.weight_decay"' in html
    rows = api.client.get("/ui/api/jobs").json()["jobs"]
    assert rows[0]["search"] is True
    missing = api.client.get("/ui/jobs/nope")
    assert missing.status_code == 404 and "No such job" in missing.text
