"""The dashboard in a real browser: Debian's chromium driven by Selenium through chromium-driver, against a
real `trainctl serve` on the session's Ray head running a real debug job.

One job serves every assertion (this machine has 2 cores): a wrong token is refused, the right one signs
in, the jobs list shows the job, its page's progress advances and its curves carry one point per finished
epoch, and the cancel button ends it CANCELLED. Screenshots of each page are kept under the test's temp
dir; with TRAINCTL_README_SCREENSHOT=<path> the job page's screenshot is also written there (that is how
docs/images/dashboard-job.png is made).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.plugins.ray_cluster import RayHead
from tests.service.conftest import Service, start_service
from tests.trainer.cifar_files import write_cifar_python
from tests.trainer.jobs import ONE_WORKER

pytestmark = [pytest.mark.ray, pytest.mark.browser]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
            "(`apt-get install -y chromium chromium-driver`; .ci/run does)"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a browser
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def dash_service(ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(ray_head, tmp_path_factory.mktemp("ui") / "data", TRAINCTL_MAX_CONCURRENT_JOBS="1")
    try:
        yield svc
    finally:
        try:
            with svc.client() as c:
                for job in c.get("/v1/jobs").json()["jobs"]:
                    if job["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
                        c.post(f"/v1/jobs/{job['id']}/cancel")
        finally:
            svc.stop()


def wait(what: str, fn: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - the page may be mid-render; try again
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def test_dashboard_in_chromium(browser: Any, dash_service: Service, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> Path:
        path = shots / f"{name}.png"
        assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000, name
        return path

    def text(css: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, css).text

    assert dash_service.log_path is not None  # serve says where the dashboard is:
    assert f"trainctl dashboard: {dash_service.url}/ui/" in dash_service.log_path.read_text(errors="replace")
    with dash_service.client() as c:
        data = write_cifar_python(tmp_path / "cifar", per_batch=100)  # learnable: curves that move
        resp = c.post(
            "/v1/jobs",
            json={
                "preset": "debug",
                "overrides": {
                    "data.train": str(data),
                    "optim.epochs": 30,
                    "checkpoint.every_epochs": 1,
                    **ONE_WORKER,
                },
            },
        )
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]

        # a page needs a session: the browser lands on the login form; a wrong token is refused
        browser.get(dash_service.url + "/ui/")
        assert "/ui/login" in browser.current_url
        browser.find_element(By.ID, "token").send_keys("tc_not-a-token")
        browser.find_element(By.ID, "login-submit").click()
        assert "invalid token" in wait("the login error", lambda: text("#login-error"), 20)
        assert not browser.get_cookies()
        shot("login-refused")

        browser.find_element(By.ID, "token").send_keys(dash_service.token)
        browser.find_element(By.ID, "login-submit").click()
        wait("the jobs list", lambda: browser.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]'), 30)
        cookie = next(ck for ck in browser.get_cookies() if ck["name"] == "trainctl_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert browser.execute_script("return document.cookie") == ""  # invisible to scripts
        wait(
            "the job running in the list",
            lambda: (
                browser.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]').get_attribute("data-state")
                == "RUNNING"
            ),
            240,
        )
        shot("jobs")

        # the job page: progress advances, one chart point per finished epoch
        browser.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"] a.job-link').click()
        wait("the job page", lambda: browser.find_elements(By.ID, "chart-loss"), 30)

        def page_epoch() -> int:
            return int(browser.find_element(By.ID, "progress-fill").get_attribute("data-epoch"))

        first = wait("a first finished epoch", lambda: page_epoch() >= 1 and page_epoch(), 240)
        early_png = c.get(f"/v1/jobs/{job_id}/plots/curves.png")
        early_epochs = len(c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"])
        # past what the API had when the early PNG was drawn (a loaded machine's page may lag the API)
        later = wait(
            "progress to advance", lambda: page_epoch() >= max(first + 1, early_epochs + 1, 4) and page_epoch(), 240
        )
        assert text("#progress-text").startswith(f"epoch {later}/30") or page_epoch() > later

        def points(series: str, chart: str = "chart-loss") -> int:
            return len(browser.find_elements(By.CSS_SELECTOR, f'#{chart} g[data-series="{series}"] circle.pt'))

        drawn = wait("the curves to catch up", lambda: points("train") >= later and points("train"), 30)
        api_epochs = len(c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"])
        assert drawn <= api_epochs  # never a point for an epoch that has not finished
        assert wait(
            "one point per finished epoch",
            lambda: (
                points("train")
                == points("val")
                == points("lr", "chart-lr")
                == points("train", "chart-acc")
                == len(c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"])
            ),
            30,
        )
        assert browser.find_element(By.CSS_SELECTOR, '#chart-loss g[data-series="train"] polyline').get_attribute(
            "points"
        ).count(",") == points("train")
        # the PNG grew with the run: decoded, it differs from the one drawn at an earlier epoch
        late_png = c.get(f"/v1/jobs/{job_id}/plots/curves.png")
        assert early_png.status_code == late_png.status_code == 200
        early_img, late_img = (
            np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")) for r in (early_png, late_png)
        )
        assert len(c.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]) > early_epochs
        assert early_img.shape == late_img.shape and (early_img != late_img).any(axis=2).mean() > 0.005
        browser.execute_script("document.getElementById('chart-loss').scrollIntoView()")
        page = shot("job")
        if os.environ.get("TRAINCTL_README_SCREENSHOT"):
            browser.execute_script("window.scrollTo(0, 0)")
            shutil.copyfile(shot("job-top"), os.environ["TRAINCTL_README_SCREENSHOT"])
        assert page.exists()

        # cancel from the page (it asks first)
        browser.find_element(By.ID, "cancel-button").click()
        wait("the confirm dialog", lambda: browser.switch_to.alert, 10).accept()
        wait("CANCELLED on the page", lambda: text("#job-state") == "CANCELLED", 60)
        assert not browser.find_element(By.ID, "cancel-button").is_displayed()
        assert c.get(f"/v1/jobs/{job_id}").json()["state"] == "CANCELLED"
        shot("job-cancelled")

        # resubmit from the page with one change: a new job recording its parent (cancelled at once: one run
        # is enough for this test), then both compared from the jobs list
        browser.find_element(By.CSS_SELECTOR, "#resubmit-options summary").click()
        browser.find_element(By.ID, "resubmit-overrides").send_keys('{"optim.epochs": 2}')
        browser.find_element(By.ID, "resubmit-button").click()
        wait("the new job's page", lambda: browser.find_elements(By.ID, "job-parent"), 30)
        child_id = browser.find_element(By.ID, "job").get_attribute("data-job-id")
        assert child_id != job_id and text("#job-parent") == job_id
        assert c.post(f"/v1/jobs/{child_id}/cancel").status_code == 200
        child = c.get(f"/v1/jobs/{child_id}").json()
        assert child["parent"] == job_id and child["spec"]["optim"]["epochs"] == 2
        browser.get(dash_service.url + "/ui/")
        for jid in (job_id, child_id):
            wait(
                "the row", lambda jid=jid: browser.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{jid}"] .pick'), 30
            )
            browser.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{jid}"] .pick').click()
        browser.find_element(By.ID, "compare-button").click()
        wait(
            "the comparison",
            lambda: browser.find_elements(By.CSS_SELECTOR, '#diff-body tr[data-path="optim.epochs"]'),
            30,
        )
        assert browser.find_element(By.CSS_SELECTOR, '#diff-body tr[data-path="optim.epochs"]').text.split() == [
            "optim.epochs",
            "30",
            "2",
        ]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#compare-acc g.series")) >= 1  # the parent's curve
        shot("compare")

        # signing out ends the session
        browser.find_element(By.ID, "logout").click()
        wait("the login page", lambda: "/ui/login" in browser.current_url, 20)
        browser.get(dash_service.url + "/ui/")
        assert "/ui/login" in browser.current_url
    assert {"login-refused.png", "jobs.png", "job.png", "job-cancelled.png", "compare.png"} <= {
        p.name for p in shots.iterdir()
    }
