"""The dashboard in a real browser: Debian's Chromium (``/usr/bin/chromium``, installed by
``.ci/setup``) driven by Playwright, which never downloads a browser here.  A real server, a real
worker: pages load, a dead letter retried from the page runs, an unauthenticated POST is refused,
payloads that look like HTML are shown as text."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import Engine
from sqlalchemy import MetaData
from sqlalchemy import Text
from sqlalchemy import insert
from sqlalchemy.engine import URL
from web_support import XSS
from web_support import add_dead_letter
from web_support import private_database
from web_support import running
from worker_jobs import read_log
from worker_support import number_table
from worker_support import q4m_env
from worker_support import start_q4m
from worker_support import stop
from worker_support import wait_for

from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.web import dashboard

CHROMIUM = os.environ.get("Q4M_CHROMIUM", "/usr/bin/chromium")
TOKEN = "browser-test-token"

if not os.path.exists(CHROMIUM):  # pragma: no cover - .ci/setup installs it
    pytest.skip(
        f"no Chromium at {CHROMIUM}: apt-get install chromium (see .ci/setup)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.acceptance


@pytest.fixture(
    params=[
        pytest.param("portable", marks=pytest.mark.integration),
        pytest.param("native", marks=[pytest.mark.integration, pytest.mark.native]),
    ]
)
def db(request: pytest.FixtureRequest, server_url: URL) -> Iterator[Engine]:
    server = request.getfixturevalue("q4m_url") if request.param == "native" else server_url
    yield from private_database(server, f"q4m_browser_{request.param}_{os.getpid()}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield browser
        finally:
            browser.close()


def test_the_dashboard_in_chromium(db: Engine, browser: Any, tmp_path: Path) -> None:
    records = number_table(db, "browser_records")
    with db.begin() as conn:
        conn.execute(insert(records), [{"n": i} for i in range(5)])
    notes = queue_table("browser_notes", MetaData(), Column("note", Text, nullable=False))
    notes.create(db)
    with db.begin() as conn:
        conn.execute(insert(notes), [{"note": XSS}])
    add_dead_letter(db, "browser_records", {"n": 4242, "attempts": 2, "run_at": 0}, XSS)
    log = tmp_path / "log"
    worker = start_q4m(
        "worker",
        "worker_jobs:RecordJob",
        "--url",
        db.url.render_as_string(hide_password=False),
        "--concurrency",
        "2",
        "--heartbeat",
        "0.5",
        env=q4m_env(WORKER_TABLE="browser_records", WORKER_LOG=str(log)),
        output=tmp_path / "worker.out",
    )
    dialogs: list[str] = []
    try:
        wait_for(lambda: len(read_log(str(log))) >= 5, 60, "the worker to run the first jobs")
        with running(dashboard(db, token=TOKEN, refresh=1.0)) as url:
            context = browser.new_context()
            page = context.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            # not logged in: the login form; a wrong token is refused
            page.goto(url + "/")
            assert page.url == url + "/login"
            page.fill("input[name=token]", "not-the-token")
            page.click("button[type=submit]")
            assert "wrong token" in page.inner_text("main")
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(url + "/")
            # the overview: both queues, the worker alive
            page.wait_for_selector("text=1 worker process(es) alive", timeout=30_000)
            table = page.inner_text("#queues")
            assert "browser_records" in table and "browser_notes" in table
            page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
            # live refresh swaps <main> in place
            page.wait_for_selector("body[data-refreshed]", state="attached", timeout=15_000)
            # workers page
            page.click("header >> text=Workers")
            assert "alive" in page.inner_text("#workers")
            assert "browser_records" in page.inner_text("#workers")
            # a job whose payload is HTML shows as text
            page.goto(url + "/queues/browser_notes")
            assert XSS[:40] in page.inner_text("#jobs")
            page.click("#jobs a")
            assert XSS in page.inner_text("pre.payload")
            assert page.title() != "pwned"
            # dead letters: the error as text; retried from the page, the job runs
            page.goto(url + "/dead")
            assert XSS[:40] in page.inner_text("#dead")
            page.click("#dead a[href*='/dead/']")
            assert page.inner_text("#error") == XSS
            page.screenshot(path=str(tmp_path / "dead.png"), full_page=True)
            page.click("form[action$='/dead/retry'] button")
            page.wait_for_url("**/dead?flash=*")
            assert "requeued 1 dead letter(s) of browser_records" in page.inner_text(".flash")
            wait_for(
                lambda: any(e == "done" and n == 4242 for e, n, _ in read_log(str(log))),
                60,
                "the retried job to run",
            )
            # a POST from a browser that is not logged in is refused
            anonymous = browser.new_context()
            stranger = anonymous.new_page()
            stranger.goto(url + "/login")
            status = stranger.evaluate(
                """async (base) => (await fetch(base + '/dead/purge', {method: 'POST',
                     headers: {'content-type': 'application/x-www-form-urlencoded'},
                     body: 'queue=browser_records&all=1'})).status""",
                url,
            )
            assert status == 401
            anonymous.close()
            assert page.title() != "pwned" and not dialogs
            context.close()
        for name in ("overview.png", "dead.png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        target = os.environ.get("Q4M_SCREENSHOTS_DIR")
        if target:  # docs/screenshots.py uses the demo's database instead
            for name in ("overview.png", "dead.png"):
                shutil.copy(tmp_path / name, Path(target) / name)
    finally:
        stop(worker)
