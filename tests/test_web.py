"""The web dashboard over HTTP (a real Uvicorn server, httpx as the client) on the real servers:
pages, authentication, CSRF, escaping, read-only mode, mounting, /metrics."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy.engine import URL
from web_support import XSS
from web_support import add_dead_letter
from web_support import private_database
from web_support import running
from worker_support import number_table
from worker_support import q4m_env
from worker_support import start_q4m
from worker_support import stop
from worker_support import wait_for

from sqlalchemy_q4m import ops
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.web import Auth
from sqlalchemy_q4m.web import dashboard
from sqlalchemy_q4m.web import serve

httpx = pytest.importorskip("httpx")

TABLE = "web_jobs"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(
    params=[
        pytest.param("portable", marks=pytest.mark.integration),
        pytest.param("native", marks=[pytest.mark.integration, pytest.mark.native]),
    ]
)
def db(request: pytest.FixtureRequest, server_url: URL) -> Iterator[Engine]:
    server = request.getfixturevalue("q4m_url") if request.param == "native" else server_url
    yield from private_database(server, f"q4m_web_{request.param}_{os.getpid()}")


@pytest.fixture
def portable_db(server_url: URL) -> Iterator[Engine]:
    yield from private_database(server_url, f"q4m_web_p_{os.getpid()}")


def seed(engine: Engine) -> None:
    table = number_table(engine, TABLE)
    with engine.begin() as conn:
        conn.execute(insert(table), [{"n": i, "run_at": 0} for i in range(3)])
        conn.execute(insert(table), [{"n": 99, "run_at": int(time.time()) + 3600}])
    add_dead_letter(engine, TABLE, {"n": 7, "attempts": 2, "run_at": 0}, XSS)


def login(client: httpx.Client) -> None:
    page = client.get("/login")
    assert page.status_code == 200
    answer = client.post("/login", data={"token": TOKEN, "csrf": csrf_of(page.text)})
    assert answer.status_code == 303, answer.text


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return len(ops.list_jobs(conn, _table(conn), limit=500).rows)


def _table(conn: object) -> object:
    from sqlalchemy_q4m.schema.reflect import reflect_queue_table

    return reflect_queue_table(conn, TABLE)  # type: ignore[arg-type]


def test_pages_show_queues_jobs_dead_letters_and_retry_works(db: Engine) -> None:
    seed(db)
    with running(dashboard(db, token=TOKEN)) as url, httpx.Client(base_url=url) as client:
        login(client)
        home = client.get("/")
        assert home.status_code == 200
        assert f'href="/queues/{TABLE}"' in home.text
        row = re.search(rf"<a href=\"/queues/{TABLE}\">{TABLE}</a>(.*?)</tr>", home.text, re.S)
        assert row is not None
        numbers = re.findall(r'<td class="n"[^>]*>(.*?)</td>', row.group(1), re.S)
        assert [re.sub("<[^>]+>", "", n).strip() for n in numbers[:5]] == ["4", "3", "1", "0", "1"]
        assert "Throughput, last hour" in home.text
        for header, value in (
            ("x-frame-options", "DENY"),
            ("x-content-type-options", "nosniff"),
        ):
            assert home.headers[header] == value
        assert "script-src 'self'" in home.headers["content-security-policy"]

        queue = client.get(f"/queues/{TABLE}?state=delayed")
        assert queue.status_code == 200 and ">99<" in queue.text
        (job_id,) = re.findall(rf'/queues/{TABLE}/jobs/([0-9a-f-]{{36}})"', queue.text)
        job = client.get(f"/queues/{TABLE}/jobs/{job_id}")
        assert job.status_code == 200 and '"n": 99' in html.unescape(job.text)
        assert client.get(f"/queues/{TABLE}?state=ready").text.count("/jobs/") == 3
        assert "No job in hand." in client.get(f"/queues/{TABLE}?state=in_hand").text

        deadpage = client.get("/dead")
        assert deadpage.status_code == 200
        assert XSS not in deadpage.text  # escaped: text, never markup
        assert "&lt;script&gt;" in deadpage.text
        (letter_id,) = re.findall(r'href="/dead/(\d+)"', deadpage.text)
        detail = client.get(f"/dead/{letter_id}")
        assert (
            "&lt;script&gt;document.title" in detail.text and "<script>document" not in detail.text
        )
        assert "RuntimeError" in detail.text

        before = count(db)
        retried = client.post(
            "/dead/retry",
            data={"csrf": csrf_of(detail.text), "queue": TABLE, "id": letter_id},
        )
        assert retried.status_code == 303
        assert "requeued+1" in retried.headers["location"]
        assert count(db) == before + 1
        assert "requeued 1 dead letter(s)" in client.get(retried.headers["location"]).text
        assert "No dead letters" in client.get("/dead").text
        spoofed = client.get("/dead?flash=Your+account+is+locked&sig=0")
        assert "account is locked" not in spoofed.text


def test_changes_need_authentication_and_the_csrf_token(portable_db: Engine) -> None:
    seed(portable_db)
    with (
        running(dashboard(portable_db, token=TOKEN)) as url,
        httpx.Client(base_url=url) as client,
    ):
        # not logged in: the pages send to the login form, POSTs are refused
        assert client.get("/").status_code == 303
        assert client.get("/").headers["location"] == "/login"
        refused = client.post("/dead/purge", data={"queue": TABLE, "all": "1"})
        assert refused.status_code == 401
        login_page = client.get("/login")
        wrong = client.post(
            "/login", data={"token": "guess-guess", "csrf": csrf_of(login_page.text)}
        )
        assert wrong.status_code == 403
        assert client.get("/").status_code == 303
        login(client)
        # logged in, but no CSRF token, or another one: refused
        no_csrf = client.post("/dead/purge", data={"queue": TABLE, "all": "1"})
        assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
        forged = client.post("/dead/purge", data={"queue": TABLE, "all": "1", "csrf": "x" * 43})
        assert forged.status_code == 403
        page = client.get("/dead")
        other_site = client.post(
            "/dead/purge",
            data={"queue": TABLE, "all": "1", "csrf": csrf_of(page.text)},
            headers={"origin": "https://evil.example"},
        )
        assert other_site.status_code == 403
        with portable_db.connect() as conn:
            assert ops.dead_counts(conn) == {TABLE: 1}
        # a queue name that is not a queue table of the database
        for name in ("q4m_dead_letters", "nope`; DROP TABLE web_jobs; --"):
            bad = client.post(
                "/dead/purge", data={"queue": name, "all": "1", "csrf": csrf_of(page.text)}
            )
            assert bad.status_code == 400
            assert client.get(f"/queues/{name}").status_code == 404
        assert client.get(f"/queues/{TABLE}?state=bogus").status_code == 400
        # with both: purged
        done = client.post(
            "/dead/purge", data={"queue": TABLE, "all": "1", "csrf": csrf_of(page.text)}
        )
        assert done.status_code == 303
        with portable_db.connect() as conn:
            assert ops.dead_counts(conn) == {}
        # a bearer token works for scripts too (with the CSRF pair)
    with running(dashboard(portable_db, token=TOKEN)) as url:
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}) as api:
            assert api.get("/").status_code == 200
        with httpx.Client(base_url=url, headers={"authorization": "Bearer wrong-token"}) as api:
            assert api.get("/", follow_redirects=False).status_code == 303


def test_basic_auth_protects_every_page(portable_db: Engine) -> None:
    seed(portable_db)
    app = dashboard(portable_db, basic_auth="ops:pa55word")
    with running(app) as url, httpx.Client(base_url=url) as anonymous:
        refused = anonymous.get("/")
        assert refused.status_code == 401 and "Basic" in refused.headers["www-authenticate"]
        assert anonymous.get("/metrics").status_code == 401
        with httpx.Client(base_url=url, auth=("ops", "wrong")) as wrong:
            assert wrong.get("/dead").status_code == 401
        with httpx.Client(base_url=url, auth=("ops", "pa55word")) as client:
            page = client.get("/dead")
            assert page.status_code == 200 and "Retry all 1" in page.text
            answer = client.post(
                "/dead/retry", data={"queue": TABLE, "all": "1", "csrf": csrf_of(page.text)}
            )
            assert answer.status_code == 303
    header = base64.b64encode(b"ops:pa55word").decode()
    assert header  # the header httpx sent above


def test_read_only_hides_and_refuses_changes(portable_db: Engine) -> None:
    seed(portable_db)
    for app in (dashboard(portable_db), dashboard(portable_db, token=TOKEN, read_only=True)):
        with running(app) as url, httpx.Client(base_url=url) as client:
            if client.get("/", follow_redirects=False).status_code == 303:
                login(client)
            page = client.get("/dead")
            assert page.status_code == 200
            assert "read-only" in page.text
            assert "Retry" not in page.text and "Purge" not in page.text
            assert 'href="/enqueue"' not in client.get("/").text
            csrf = client.cookies.get("q4m_csrf")
            refused = client.post("/dead/retry", data={"queue": TABLE, "all": "1", "csrf": csrf})
            assert refused.status_code == 403
            refused = client.post("/enqueue", data={"queue": TABLE, "jobs": "{}", "csrf": csrf})
            assert refused.status_code == 403
    with portable_db.connect() as conn:
        assert ops.dead_counts(conn) == {TABLE: 1}


def test_enqueue_form(portable_db: Engine) -> None:
    seed(portable_db)
    with (
        running(dashboard(portable_db, token=TOKEN)) as url,
        httpx.Client(base_url=url) as client,
    ):
        login(client)
        form = client.get(f"/enqueue?queue={TABLE}")
        assert f'<option value="{TABLE}" selected>' in form.text
        csrf = csrf_of(form.text)
        bad = client.post("/enqueue", data={"queue": TABLE, "jobs": "{not json", "csrf": csrf})
        assert bad.status_code == 400 and "invalid JSON" in bad.text
        assert "{not json" in bad.text  # the text is kept for fixing
        wrong_column = client.post(
            "/enqueue", data={"queue": TABLE, "jobs": '{"nope": 1}', "csrf": csrf}
        )
        assert wrong_column.status_code == 400 and "nope" in wrong_column.text
        scripted = client.post(
            "/enqueue",
            data={"queue": TABLE, "jobs": json.dumps({"n": XSS}), "csrf": csrf},
        )
        assert scripted.status_code == 400 and XSS not in scripted.text
        elsewhere = client.post(
            "/enqueue", data={"queue": "q4m_workers", "jobs": '{"n": 1}', "csrf": csrf}
        )
        assert elsewhere.status_code == 400 and "no queue table" in elsewhere.text
        before = count(portable_db)
        ok = client.post(
            "/enqueue",
            data={"queue": TABLE, "jobs": '[{"n": 41}, {"n": 42}]', "delay": "", "csrf": csrf},
        )
        assert ok.status_code == 303 and ok.headers["location"].startswith(f"/queues/{TABLE}?")
        assert count(portable_db) == before + 2
        delayed = client.post(
            "/enqueue", data={"queue": TABLE, "jobs": '{"n": 43}', "delay": "600", "csrf": csrf}
        )
        assert delayed.status_code == 303
        assert ">43<" in client.get(f"/queues/{TABLE}?state=delayed").text


def test_mounted_in_a_starlette_app_and_metrics(portable_db: Engine) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    seed(portable_db)
    host = Starlette(routes=[Mount("/queues", app=dashboard(portable_db, auth=lambda r: True))])
    with running(host) as url, httpx.Client(base_url=url) as client:
        page = client.get("/queues/")
        assert page.status_code == 200
        assert 'href="/queues/static/style.css"' in page.text
        assert f'href="/queues/queues/{TABLE}"' in page.text
        assert client.get("/queues/static/app.js").status_code == 200
        dead = client.get("/queues/dead")
        answer = client.post(
            "/queues/dead/retry", data={"queue": TABLE, "all": "1", "csrf": csrf_of(dead.text)}
        )
        assert answer.status_code == 303 and answer.headers["location"].startswith("/queues/dead")
        metrics = client.get("/queues/metrics").text
        assert f'q4m_queue_jobs{{queue="{TABLE}",state="total"}} 5.0' in metrics
        assert f'q4m_queue_jobs{{queue="{TABLE}",state="delayed"}} 1.0' in metrics
        assert f'q4m_dead_letters{{queue="{TABLE}"}} 0.0' in metrics
        assert re.search(rf'q4m_queue_oldest_job_age_seconds{{queue="{TABLE}"}} \d', metrics)
        assert 'q4m_workers{state="alive"} 0.0' in metrics
    with portable_db.connect() as conn:
        table = _table(conn)
        assert conn.execute(select(func.count()).select_from(table)).scalar() == 5  # type: ignore[arg-type]


@pytest.mark.unit
def test_serve_refuses_a_public_address_without_credentials() -> None:
    with pytest.raises(Q4MError, match=r"refusing to listen on 0\.0\.0\.0"):
        serve("mysql+pymysql://root@127.0.0.1:1/x", host="0.0.0.0", port=1)
    with pytest.raises(Q4MError, match="8 characters"):
        Auth(token="short")
    with pytest.raises(Q4MError, match="USER:PASSWORD"):
        Auth(basic="nocolon")


@pytest.mark.acceptance
def test_a_killed_worker_is_shown_as_lost(portable_db: Engine, tmp_path: Path) -> None:
    table = number_table(portable_db, TABLE)
    with portable_db.begin() as conn:
        conn.execute(insert(table), [{"n": 1}])
    worker = start_q4m(
        "worker",
        "worker_jobs:RecordJob",
        "--url",
        portable_db.url.render_as_string(hide_password=False),
        "--heartbeat",
        "0.3",
        env=q4m_env(WORKER_TABLE=TABLE, WORKER_LOG=str(tmp_path / "log"), WORKER_SLEEP="60"),
        output=tmp_path / "out",
    )
    try:
        app = dashboard(portable_db, stale_after=2)
        with running(app) as url, httpx.Client(base_url=url) as client:
            page = wait_for(
                lambda: (p := client.get("/workers").text) and "?state=in_hand" in p and p,
                60,
                "the worker and its job in hand on the workers page",
            )
            assert f">{worker.pid}<" in page and 'class="alive"' in page
            assert "1 worker process(es) alive" in client.get("/").text
            worker.kill()  # no clean stop: the row stays and goes silent
            worker.wait(30)
            lost = wait_for(
                lambda: 'class="lost"' in (p := client.get("/workers").text) and p, 30, "lost"
            )
            assert f">{worker.pid}<" in lost
            home = client.get("/").text
            assert "0 worker process(es) alive" in home and "1 lost" in home
    finally:
        stop(worker)
