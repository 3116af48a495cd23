"""The admin page in a real headless browser (Debian's chromium + chromedriver, via selenium).

A superuser sees a held lease and releases it with the button (the key is free in the store
and the admin log has the release); a staff user with the view permission only sees the list
without the button, and a POST forged from that browser session is refused with 403.

Without chromium this skips locally and fails when CI is set (CI installs it: .ci/run).
Set CELERY_EXCLUSIVE_SCREENSHOT=/tmp/admin.png to keep a screenshot of the page.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.admin.models import DELETION, LogEntry

from celery_exclusive import Store

from ..conftest import unavailable

selenium = pytest.importorskip("selenium", reason="pip install selenium (in the test extra)")

from selenium import webdriver  # noqa: E402 (after the importorskip)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

LIST_PATH = "/admin/celery_exclusive/heldlease/"
RELEASE_PATH = LIST_PATH + "release/"
SYNC_KEY = "myapp.sync_customer:customer_id=42"
REPORT_KEY = "myapp.run_report"


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def live_server() -> Iterator[str]:
    """The test project served on a free loopback port (admin static files included)."""
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.test.testcases import LiveServerThread

    thread = LiveServerThread("127.0.0.1", StaticFilesHandler, port=0)
    thread.daemon = True
    thread.start()
    thread.is_ready.wait(30)
    if thread.error:
        raise thread.error
    try:
        yield f"http://127.0.0.1:{thread.port}"
    finally:
        thread.terminate()


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = _binary("chromium", "chromium-browser", "google-chrome")
    driver_path = _binary("chromedriver")
    if chromium is None or driver_path is None:
        unavailable("no chromium/chromedriver: apt-get install chromium chromium-driver")
    assert chromium is not None and driver_path is not None
    profile = tempfile.mkdtemp(prefix="cex-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,700",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def log_in(driver: Any, base: str, username: str, password: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{base}/admin/login/?next={LIST_PATH}")
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    WebDriverWait(driver, 15).until(ec.presence_of_element_located((By.ID, "held-leases")))


def row(driver: Any, key: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'tr.lease-row[data-key="{key}"]')


def test_superuser_releases_a_lease_and_the_admin_log_has_it(
    live_server: str, browser: Any, leases: Store, superuser: Any, tmp_path: Path
) -> None:
    # Given a running sync for customer 42 and a report, as their Celery tasks hold them
    sync = leases.lease(
        SYNC_KEY,
        meta={"task_id": "5f0c-42", "task_name": "myapp.sync_customer", "node": "celery@w1"},
    )
    report = leases.lease(
        REPORT_KEY,
        meta={"task_id": "9a1e-07", "task_name": "myapp.run_report", "node": "celery@w2"},
    )
    assert sync.acquire() and report.acquire()

    # When the superuser opens the page
    log_in(browser, live_server, superuser.username, "pw-admin")
    text = row(browser, SYNC_KEY).text
    for expected in ("5f0c-42", "myapp.sync_customer", "celery@w1", str(sync.fence)):
        assert expected in text
    assert row(browser, REPORT_KEY)
    shot = tmp_path / "admin.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("CELERY_EXCLUSIVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["CELERY_EXCLUSIVE_SCREENSHOT"])

    # ... and releases the sync with its button
    row(browser, SYNC_KEY).find_element(By.NAME, "release").click()
    WebDriverWait(browser, 15).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "ul.messagelist li.success"))
    )

    # Then the key is free in the store, the page no longer lists it, and the log has it
    assert leases.holders(SYNC_KEY) == []
    assert not browser.find_elements(By.CSS_SELECTOR, f'tr.lease-row[data-key="{SYNC_KEY}"]')
    assert row(browser, REPORT_KEY)
    entry = LogEntry.objects.get(object_id=SYNC_KEY, user=superuser)
    assert entry.action_flag == DELETION and sync.token in entry.change_message
    assert sync.renew() is False  # the holder learns it at its next renewal
    report.release()


def test_viewer_has_no_release_button_and_a_forged_post_gets_403(
    live_server: str, browser: Any, leases: Store, viewer: Any
) -> None:
    sync = leases.lease(SYNC_KEY, meta={"task_id": "5f0c-42"})
    assert sync.acquire()

    log_in(browser, live_server, viewer.username, "pw-viewer")
    assert "5f0c-42" in row(browser, SYNC_KEY).text
    assert browser.find_elements(By.NAME, "release") == []

    # A POST forged from this session, with its valid CSRF token: refused by the permission.
    status = browser.execute_async_script(
        """
        const [url, key, token, done] = arguments;
        const csrf = document.cookie.split("; ").find(c => c.startsWith("csrftoken="));
        fetch(url, {
            method: "POST",
            credentials: "same-origin",
            headers: {"X-CSRFToken": csrf ? csrf.split("=")[1] : "",
                      "Content-Type": "application/x-www-form-urlencoded"},
            body: new URLSearchParams({key: key, token: token}),
        }).then(r => done(r.status), e => done(String(e)));
        """,
        live_server + RELEASE_PATH,
        SYNC_KEY,
        sync.token,
    )
    assert status == 403
    assert [h.token for h in leases.holders(SYNC_KEY)] == [sync.token]
    assert not LogEntry.objects.filter(object_id=SYNC_KEY, user=viewer).exists()
    sync.release()


def test_the_page_fits_a_1280_pixel_screen(
    live_server: str, browser: Any, leases: Store, superuser: Any, tmp_path: Path
) -> None:
    # Given leases as real Celery tasks hold them: long keys, full task ids, long names
    held = []
    for n in range(3):
        lease = leases.lease(
            f"billing.tasks.sync_customer_invoices:customer_id={1000 + n},region=eu-west-{n}",
            meta={
                "task_id": str(uuid.uuid4()),
                "task_name": "billing.tasks.sync_customer_invoices",
                "node": f"celery@worker-{n}.prod.eu-west-1.internal.example.com",
            },
        )
        assert lease.acquire()
        held.append(lease)
    # When the superuser opens the page in a 1280 x 800 window
    browser.set_window_size(1280, 800)
    log_in(browser, live_server, superuser.username, "pw-admin")
    shot = tmp_path / "admin-1280.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("CELERY_EXCLUSIVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["CELERY_EXCLUSIVE_SCREENSHOT"].replace(".png", "-1280.png"))
    # Then nothing needs a horizontal scroll: every fence and every Release button is on screen
    width = browser.execute_script("return document.documentElement.clientWidth")
    assert width <= 1280
    scroll = browser.execute_script("return document.documentElement.scrollWidth")
    assert scroll <= width, f"the page is {scroll} px wide in a {width} px window"
    for lease in held:
        cells = row(browser, lease.key).find_elements(By.TAG_NAME, "td")
        fence = next(c for c in cells if c.text == str(lease.fence))
        button = row(browser, lease.key).find_element(By.NAME, "release")
        for element in (fence, button):
            right = element.rect["x"] + element.rect["width"]
            assert element.is_displayed() and right <= width, (element.text, right, width)
        lines = browser.execute_script(
            "const r = document.createRange(); r.selectNodeContents(arguments[0]);"
            "return r.getClientRects().length;",
            button,
        )
        assert lines == 1, f"the Release button's text is on {lines} lines"
    for lease in held:
        lease.release()
