"""The user interfaces in a real browser: headless Chromium (Debian's package) driven by Playwright, on the
compose stack after its job finished. Each page is saved as a screenshot under ``build/test-artifacts``
(listed at the end of the test run) and its rendered content is checked."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.deployment.conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--no-first-run",
    "--disable-quic",
    # The machine has no network beyond loopback: no background fetches, updates or sync.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def page(admin_key) -> Iterator[Any]:
    """A browser page that answers the dashboard's password prompt with the admin key (HTTP Basic)."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail("Chromium is not installed: apt-get install chromium (Debian's package)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            credentials = {"username": "operator", "password": admin_key}
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, http_credentials=credentials)
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


@pytest.fixture
def screenshot(screenshots) -> Callable[[Any, str], None]:
    def take(page: Any, name: str) -> None:
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000  # a rendered page, not a blank one
        screenshots.append(path)

    return take


@pytest.mark.parametrize("server", ["api", "dashboard"])
def test_the_dashboard_shows_the_finished_study_with_its_trials_and_intermediate_values(
    compose_stack, finished_job, admin_key, page, screenshot, server
):
    """``/dashboard/`` of the API and of the standalone dashboard: the study list, the study page with the
    intermediate-value plot (one line per trial), and the trial list with each trial's state."""
    base = compose_stack.url(server, {"api": 8000, "dashboard": 8080}[server])
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=10)
    with client:
        summaries = client.get("/dashboard/api/studies").json()["study_summaries"]
        [study_id] = [s["study_id"] for s in summaries if s["study_name"] == finished_job["study_name"]]
        trials = client.get(f"/dashboard/api/studies/{study_id}", params={"after": 0}).json()
    numbers = sorted(t["number"] for t in trials["trials"])

    page.goto(f"{base}/dashboard/")
    page.get_by_text(finished_job["study_name"]).first.wait_for()
    screenshot(page, f"{server}-dashboard-studies")

    page.goto(f"{base}/dashboard/studies/{study_id}")
    intermediate = page.locator(".MuiCard-root", has_text="Intermediate values")
    intermediate.locator(".js-plotly-plot .legendtext").first.wait_for()
    legend = intermediate.locator(".js-plotly-plot .legendtext").all_text_contents()
    assert sorted(text.strip() for text in legend) == [f"trial #{n}" for n in numbers]
    assert intermediate.locator(".js-plotly-plot .scatterlayer .trace").count() == len(numbers)
    best = finished_job["best_trial"]["number"]
    page.get_by_text(f"Best Trial (number={best})").wait_for()
    assert finished_job["study_name"] in page.inner_text("header")
    screenshot(page, f"{server}-dashboard-study")

    page.goto(f"{base}/dashboard/studies/{study_id}/trials")
    page.get_by_text(f"{len(numbers)} Trials").wait_for()
    listed = page.inner_text("body")
    for trial in trials["trials"]:
        assert f"Trial {trial['number']}\n{trial['state']}" in listed
    screenshot(page, f"{server}-dashboard-trials")


def test_the_api_docs_render_every_route_from_local_assets(compose_stack, page, screenshot):
    base = compose_stack.url("api", 8000)
    external: list[str] = []
    page.on("request", lambda r: r.url.startswith(base) or external.append(r.url))
    page.goto(f"{base}/docs")
    page.locator(".opblock").first.wait_for()
    schema = httpx.get(f"{base}/openapi.json", timeout=10).json()
    shown = {
        (
            block.locator(".opblock-summary-method").inner_text(),
            block.locator(".opblock-summary-path").inner_text().replace("\u200b", ""),
        )
        for block in page.locator(".opblock").all()
    }
    documented = {
        (method.upper(), path) for path, operations in schema["paths"].items() for method in operations
    }
    assert shown == documented and ("POST", "/v1/jobs") in shown
    assert "Entropy-SGD as a service" in page.inner_text(".info")
    assert external == []  # the page's scripts and styles come from the service itself, not a CDN
    screenshot(page, "api-docs")
