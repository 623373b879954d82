"""The Prefect UI in a real headless Chromium starts a copy with its Run button.

Debian's /usr/bin/chromium is driven through Playwright; no browser is
downloaded. Screenshots go to the test's tmp folder; with
DIRIMAGE_UPDATE_SCREENSHOTS=1 they also replace the ones in tests/data/screenshots
that the README shows.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from serverkit import tail

import faultkit
import imagekit

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Wide enough for every column of the summary table beside the run's details.
VIEWPORT = {"width": 1600, "height": 1000}
UI_TIMEOUT_MS = 60_000
MIB = 1024 * 1024
SCREENSHOTS = Path(__file__).resolve().parents[1] / "data" / "screenshots"
# Screenshots the README shows, copied when DIRIMAGE_UPDATE_SCREENSHOTS=1.
KEPT_SCREENSHOTS = ("run-page.png", "summary-artifact.png")


def blob_digests(image: Path) -> list[str]:
    return [f"sha256:{blob.name}" for blob in imagekit.blob_files(image)]


@pytest.fixture
def short_root():
    """A new folder with a short path, so the paths the screenshots show read well."""
    root = Path(tempfile.mkdtemp(prefix="dirimage-ui-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        imagekit.require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


def click_run(form, deployment_id: str, attempts: int = 3):
    """Click the form's Run button; returns the response that creates the run.

    The server's SQLite database answers a write that collides with another
    one with "database is locked", which the API sends as 503. Prefect's own
    client retries those; the UI shows the error and keeps the form open, for
    the user to click again, as this does.
    """
    for _ in range(attempts):
        with form.page.expect_response(
            lambda response: (
                response.url.endswith(
                    f"/api/deployments/{deployment_id}/create_flow_run"
                )
                and response.request.method == "POST"
            )
        ) as created:
            form.get_by_role("button", name="Run", exact=True).click()
        if created.value.status != 503:
            break
    return created.value


def test_run_button_starts_a_copy_that_completes(
    prefect_server, dirimage_serve, browser, short_root, tmp_path
):
    imagekit.require_tool("skopeo")
    # A new version of an app over its previous one, in folders named as on a
    # server: the two share their first two layers, which the copy reuses.
    source = short_root / "srv/images/app"
    destination = short_root / "backup/images/app"
    faultkit.make_synthetic_image(destination, [12 * MIB, 6 * MIB], "app")
    faultkit.make_synthetic_image(source, [12 * MIB, 6 * MIB, 2 * MIB], "app")
    served = dirimage_serve(
        "ui", "--param", f"source={source}", "--param", f"destination={destination}"
    )
    deployment = prefect_server.deployment("copy-image", "ui")
    shots = tmp_path / "screenshots"
    shots.mkdir()

    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(f"{prefect_server.url}/deployments/deployment/{deployment['id']}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("button", name="Quick run").click()

    # Quick run asks to confirm the parameters, filled in with the defaults
    # `dirimage serve --param` gave the deployment.
    form = page.get_by_role("dialog")
    form.get_by_text("Folder of the image to copy").wait_for()
    assert str(source) in form.locator("textarea").first.input_value()
    page.screenshot(path=shots / "run-form.png")
    created = click_run(form, deployment["id"])
    assert created.status == 201, created.text()
    run_id = created.json()["id"]

    run = prefect_server.wait_for_run(run_id, log_path=served.log_path)
    assert run["state_type"] == "COMPLETED", tail(served.log_path)
    assert imagekit.read_manifest(destination) == imagekit.read_manifest(source)
    imagekit.skopeo_accepts(destination, tmp_path)

    page.goto(f"{prefect_server.url}/runs/flow-run/{run_id}")
    page.get_by_text("Completed", exact=True).first.wait_for()
    page.get_by_text("copy_blob-sha256:", exact=False).first.wait_for()
    page.get_by_text("Artifacts", exact=True).first.click()
    summary_card = page.get_by_text(f"{source} to {destination}", exact=False).first
    summary_card.wait_for()
    page.screenshot(path=shots / "run-page.png")
    summary_card.click()
    # The table lists every blob with its size, action and seconds.
    table = page.get_by_role("table")
    table.wait_for()
    header = table.get_by_role("row").first.inner_text()
    for column in ("blob", "size", "action", "seconds"):
        assert column in header, header
    for digest in blob_digests(source):
        table.get_by_text(digest, exact=True).wait_for()
    for action in ("copied", "reused"):
        table.get_by_text(action, exact=True).first.wait_for()
    page.screenshot(path=shots / "summary-artifact.png", full_page=True)

    for name in ("run-form.png", "run-page.png", "summary-artifact.png"):
        assert (shots / name).stat().st_size > 10_000, f"{name} looks empty"
    if os.environ.get("DIRIMAGE_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in KEPT_SCREENSHOTS:
            shutil.copyfile(shots / name, SCREENSHOTS / name)
