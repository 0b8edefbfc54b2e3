"""Bad input gets a clear error and changes nothing (issue 11, items 10-13), on the real
servers: MariaDB (portable) and, with ``Q4M_TEST_URL``, the Q4M engine (native).

The Q4M engine is not transactional: strict mode only rejects a bad value in the first row of
a multi-row INSERT, later rows are coerced with a warning, and rows sent stay whatever the
transaction does.  So every check has to happen on the client, before the first INSERT.
"""

from __future__ import annotations

import io
import json
import math
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy import DateTime
from sqlalchemy import Engine
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import Numeric
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import create_engine
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.dialects.mysql import LONGTEXT
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator
from worker_support import count_rows
from worker_support import q4m_env
from worker_support import run_q4m

from sqlalchemy_q4m import QueueSession
from sqlalchemy_q4m import enqueue
from sqlalchemy_q4m import queue_table
from sqlalchemy_q4m.cli.commands import main
from sqlalchemy_q4m.exc import OptionError
from sqlalchemy_q4m.exc import Q4MError
from sqlalchemy_q4m.exc import RowError
from sqlalchemy_q4m.schema.retry import retry_columns

PASSWORD = "S3cret-pw-Q4M"
ONE = '{"n": 1}'


class Picky(TypeDecorator[int]):
    """An integer whose bind processing refuses 13 (a check only the type itself makes)."""

    impl = Integer
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value == 13:
            raise ValueError("13 is unlucky")
        return value


@pytest.fixture(
    params=["portable", pytest.param("native", marks=pytest.mark.native)], scope="module"
)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, str]]:
    """(engine, URL text) of the stock MariaDB database or of the Q4M server."""
    if request.param == "portable":
        url: URL = request.getfixturevalue("db_url")
    else:
        url = request.getfixturevalue("q4m_url")
    engine = create_engine(url, poolclass=NullPool)
    yield engine, url.render_as_string(hide_password=False)
    engine.dispose()


@pytest.fixture
def jobs(server: tuple[Engine, str]) -> Iterator[Table]:
    """A fresh queue table ``n INT NOT NULL, s VARCHAR(5), amount DECIMAL(5,2), at DATETIME,
    picky, body LONGTEXT, attempts, run_at`` on the server."""
    engine, _ = server
    metadata = MetaData()
    table = queue_table(
        f"tbad_{uuid.uuid4().hex[:8]}",
        metadata,
        Column("n", Integer, nullable=False),
        Column("s", String(5)),
        Column("amount", Numeric(5, 2)),
        Column("at", DateTime),
        Column("picky", Picky),
        Column("body", LONGTEXT),
        *retry_columns(),
    )
    metadata.create_all(engine)
    yield table
    metadata.drop_all(engine)


def q4m(capsys: pytest.CaptureFixture[str], *args: str, stdin: bytes | None = None) -> Any:
    """``main(args)`` in-process with ``stdin`` as piped bytes; (exit code, stdout, stderr)."""
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_exit_2(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("q4m") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def lines_of(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# -- item 10: a bad row among many enqueues nothing, and the input line is named -----------------


@pytest.mark.integration
def test_cli_bad_value_on_line_1200_of_1500_enqueues_nothing_and_names_the_line(
    server: tuple[Engine, str], jobs: Table, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, url = server
    rows: list[dict[str, Any]] = [{"n": i} for i in range(1, 1501)]
    rows[1198] = {"n": "oops"}  # input line 1200: the first line is blank
    stdin = b"\n" + lines_of(rows)
    code, _, err = q4m(capsys, "enqueue", jobs.name, "--url", url, stdin=stdin)
    assert_one_line_exit_2(code, err, "stdin line 1200:", "'n'", "takes an integer", "'oops'")
    assert count_rows(engine, jobs) == 0
    rows[1198] = {"n": 1199}  # fixed input: a re-run enqueues each job exactly once
    code, out, _ = q4m(capsys, "enqueue", jobs.name, "--url", url, stdin=b"\n" + lines_of(rows))
    assert code == 0 and "enqueued 1500 job(s)" in out
    with engine.connect() as conn:
        assert sorted(conn.scalars(select(jobs.c.n))) == list(range(1, 1501))


@pytest.mark.integration
def test_cli_json_option_names_itself(
    server: tuple[Engine, str], jobs: Table, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, url = server
    code, _, err = q4m(capsys, "enqueue", jobs.name, "--url", url, "--json", '{"n": 1, "s": 7}')
    assert_one_line_exit_2(code, err, "--json line 1:", "'s'", "takes a string")
    assert count_rows(engine, jobs) == 0


@pytest.mark.integration
def test_enqueue_refuses_a_bad_row_1200_before_sending_row_1(
    server: tuple[Engine, str], jobs: Table
) -> None:
    """A value only the column type's own bind processing refuses (row 1200, chunk 2) used to
    fail after the first chunk was sent: on Q4M those 1000 jobs stayed."""
    engine, _ = server
    rows: list[dict[str, Any]] = [{"n": i, "picky": 100 + i} for i in range(1, 1501)]
    rows[1199]["picky"] = 13
    with pytest.raises(RowError, match="row 1200: 'picky': ValueError: 13 is unlucky") as info:
        enqueue(engine, jobs, rows)
    assert (info.value.row, info.value.column) == (1200, "picky")
    rows[1199] = {"n": 1200, "s": "toolong"}
    with pytest.raises(RowError, match=r"row 1200: 's' .*at most 5 characters"):
        enqueue(engine, jobs, rows)
    assert count_rows(engine, jobs) == 0


# -- item 11: wrongly typed values are refused on both backends ----------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("bad", "column", "reason"),
    [
        ({"n": "oops"}, "n", "takes an integer"),
        ({"n": 2**31}, "n", "from -2147483648 to 2147483647"),
        ({"n": None}, "n", "NOT NULL"),
        ({"n": 1, "s": "toolong"}, "s", "at most 5 characters"),
        ({"n": 1, "amount": "12345"}, "amount", "below 1000"),
        ({"n": 1, "at": "not a date"}, "at", "takes a datetime"),
        ({"n": 1, "s": "\ud800"}, "s", "valid Unicode"),
    ],
)
def test_a_wrongly_typed_value_is_refused_not_coerced(
    server: tuple[Engine, str], jobs: Table, bad: dict[str, Any], column: str, reason: str
) -> None:
    """On Q4M the second row of a statement used to be stored coerced ('oops' as 0, a long
    string cut, a bad date as zeros) and reported enqueued."""
    engine, _ = server
    with pytest.raises(RowError, match=f"row 2: '{column}' .*{reason}") as info:
        enqueue(engine, jobs, [{"n": 1}, bad])
    assert isinstance(info.value, Q4MError) and info.value.column == column
    assert count_rows(engine, jobs) == 0


@pytest.mark.integration
def test_values_in_another_form_are_stored_as_the_column_takes_them(
    server: tuple[Engine, str], jobs: Table, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, url = server
    row = {"n": "42", "amount": "1.25", "at": "2026-01-02T03:04:05"}
    enqueue(engine, jobs, [row])
    assert row["n"] == "42"  # the caller's row is left as it was
    code, _, err = q4m(
        capsys, "enqueue", jobs.name, "--url", url, stdin=b'{"n": "7", "at": "2026-02-03"}\n'
    )
    assert code == 0, err
    with engine.connect() as conn:
        stored = conn.execute(select(jobs.c.n, jobs.c.amount, jobs.c.at).order_by(jobs.c.n)).all()
    assert [(n, str(a), str(at)) for n, a, at in stored] == [
        (7, "None", "2026-02-03 00:00:00"),
        (42, "1.25", "2026-01-02 03:04:05"),
    ]


@pytest.mark.integration
def test_cli_wrong_type_on_q4m_and_mariadb_alike(
    server: tuple[Engine, str], jobs: Table, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, url = server
    stdin = b'{"n": 1}\n{"n": "oops"}\n'
    code, _, err = q4m(capsys, "enqueue", jobs.name, "--url", url, stdin=stdin)
    assert_one_line_exit_2(code, err, "stdin line 2:", "'n'")
    assert count_rows(engine, jobs) == 0


# -- item 12: one line and exit 2, never a traceback; NaN/infinity refused ----------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "stdin", "env", "needles"),
    [
        ([], b'{"n": 1, "s": "\\ud800"}\n', {}, ["stdin line 1:", "valid Unicode"]),
        ([], b'{"n": 1, "s": "\xff"}\n', {}, ["stdin line 1:", "not UTF-8"]),
        ([], b'{"n": 1}\n' + b"[" * 100000 + b"\n", {}, ["stdin line 2:"]),
        (["--json", ONE, "--delay", "inf"], None, {}, ["--delay", "finite"]),
        (["--json", ONE, "--delay", "nan"], None, {}, ["--delay", "finite"]),
        (["--json", ONE, "--delay", "-1"], None, {}, ["--delay", ">= 0"]),
        (["--json", ONE], None, {"Q4M_DELAY": "inf"}, ["--delay", "finite"]),
        (["--json", ONE, "--delay", "1e300"], None, {}, ["too long for 'run_at'"]),
        (["--json", ONE, "--url", "postgresql://u@h/d"], None, {}, ["MySQL or MariaDB"]),
        (["--json", ONE], None, {"Q4M_URL": "sqlite://"}, ["MySQL or MariaDB"]),
        (["--json", ONE, "--url", "mysql+pymysql://root@h/d?charset=bogus"], None, {}, ["bogus"]),
    ],
)
def test_enqueue_input_errors_are_one_line(
    server: tuple[Engine, str],
    jobs: Table,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    stdin: bytes | None,
    env: dict[str, str],
    needles: list[str],
) -> None:
    engine, url = server
    monkeypatch.setenv("Q4M_URL", url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = q4m(capsys, "enqueue", jobs.name, *args, stdin=stdin)
    assert_one_line_exit_2(code, err, *needles)
    assert count_rows(engine, jobs) == 0


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["worker", "x:Y"], {"Q4M_BACKEND": "evil"}, "invalid choice: 'evil'"),
        (["worker", "x:Y", "--backend", "evil"], {}, "invalid choice: 'evil'"),
        (["worker", "x:Y"], {"Q4M_STATUS": "loud"}, "invalid choice: 'loud'"),
        (["worker", "x:Y"], {"Q4M_LOG_LEVEL": "LOUD"}, "log level"),
        (["worker", "x:Y"], {"Q4M_GRACE": "nan"}, "--grace"),
        (["worker", "x:Y"], {"Q4M_LISTEN": "inf"}, "--listen"),
        (["worker", "x:Y", "--retry-base", "nan"], {}, "--retry-base"),
        (["worker", "x:Y"], {"Q4M_URL": "postgresql://u@h/d"}, "MySQL or MariaDB"),
        (["stats"], {"Q4M_URL": "mysql+pymysql://root@h/d?charset=bogus"}, "charset 'bogus'"),
        (["dead", "list"], {"Q4M_URL": "not a url"}, "bad database URL"),
        (["demo"], {"Q4M_URL": "mysql+nodriver://u@h/d"}, "unknown driver 'nodriver'"),
    ],
)
def test_environment_variables_are_checked_like_their_flags(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    needle: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = q4m(capsys, *args)
    assert_one_line_exit_2(code, err, needle)


@pytest.mark.integration
def test_nan_and_infinity_are_refused_by_the_library(engine: Engine) -> None:
    from sqlalchemy_q4m import Job
    from sqlalchemy_q4m import queue_batch

    metadata = MetaData()
    table = queue_table("tbad_numbers", metadata, Column("n", Integer), *retry_columns())
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(OptionError, match="timeout"):
            QueueSession(table, bind=engine, timeout=bad)  # NaN used to wait forever
        with pytest.raises(OptionError, match="poll_interval"):
            QueueSession(table, bind=engine, poll_interval=bad)  # NaN used to busy-poll
        with pytest.raises(OptionError, match="listen"):
            QueueSession(table, bind=engine, listen=bad)
        with pytest.raises(OptionError, match="timeout"):
            queue_batch(table, bind=engine, timeout=bad)
        with pytest.raises(OptionError, match="delay"):
            enqueue(engine, table, [{"n": 1}], delay=bad)  # NaN used to be a ValueError

    class NumberJob(Job):
        table_name = "tbad_numbers"

        def execute(self, job: Any) -> None:
            pass

    for option in ("wait_timeout", "poll_interval", "listen", "retry_base", "reconnect_max"):
        for bad in (math.nan, math.inf):
            with pytest.raises(OptionError, match=option.replace("_", ".")):
                NumberJob(engine, **{option: bad})


@pytest.mark.integration
def test_a_job_larger_than_max_allowed_packet_names_it(
    server: tuple[Engine, str], jobs: Table, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to reach the server, which drops the connection: 'server has gone away'."""
    engine, url = server
    with engine.connect() as conn:
        limit = int(conn.scalar(text("SELECT @@max_allowed_packet")) or 0)
    body = "x" * (limit + 1)
    with pytest.raises(RowError, match=r"row 2: .*max_allowed_packet \(\d+ bytes\)"):
        enqueue(engine, jobs, [{"n": 1}, {"n": 2, "body": body}])
    stdin = lines_of([{"n": 1}, {"n": 2, "body": body}])
    code, _, err = q4m(capsys, "enqueue", jobs.name, "--url", url, stdin=stdin)
    assert_one_line_exit_2(code, err, "stdin line 2:", "max_allowed_packet")
    assert count_rows(engine, jobs) == 0
    enqueue(engine, jobs, [{"n": 3, "body": "y" * (1024 * 1024)}])  # big, but fits
    assert count_rows(engine, jobs) == 1


# -- item 13: a URL's password is never printed ---------------------------------------------------


@pytest.fixture(scope="module")
def password_url(db_url: URL) -> Iterator[str]:
    """The test database's URL as a user with a password (made here, dropped after)."""
    user = f"q4m_pw_{uuid.uuid4().hex[:8]}"
    admin = create_engine(db_url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{PASSWORD}'"))
        conn.execute(text(f"GRANT ALL ON `{db_url.database}`.* TO '{user}'@'%'"))
    try:
        yield db_url.set(username=user, password=PASSWORD).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP USER IF EXISTS '{user}'@'%'"))
        admin.dispose()


def broken_urls(url: str) -> list[str]:
    """``url`` spoiled in every way the CLI reports, each still carrying the password."""
    return [
        url.replace(PASSWORD, PASSWORD + "-wrong"),
        url.replace("mysql+pymysql", "mysql+nodriver"),
        url.replace("mysql+pymysql", "postgresql"),
        url + "?charset=bogus",
        url + "?read_timeout=-1",  # the driver's ValueError
        url + "?bogus_param=1",  # the driver's TypeError
        url.replace("127.0.0.1:3306", "127.0.0.1:notaport"),
        url.replace("127.0.0.1:3306", "127.0.0.1:1"),
    ]


@pytest.mark.integration
def test_no_command_prints_the_password_of_a_bad_url(
    password_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = [
        ["worker", "sqlalchemy_q4m.cli.demo:ShellJob", "--burst"],
        ["enqueue", "some_jobs", "--json", "{}"],
        ["stats"],
        ["dead", "list"],
        ["dead", "retry", "some_jobs"],
        ["dead", "purge", "some_jobs"],
        ["demo", "--jobs", "1"],
    ]
    for url in broken_urls(password_url):
        for command in commands:
            for how in ("flag", "env"):
                if how == "flag":
                    args = [*command, "--url", url]
                else:
                    monkeypatch.setenv("Q4M_URL", url)
                    args = command
                code, out, err = q4m(capsys, *args)
                monkeypatch.delenv("Q4M_URL", raising=False)
                assert_one_line_exit_2(code, err)
                assert PASSWORD not in out + err, (url, command, err)


@pytest.mark.acceptance
def test_commands_that_work_print_no_password(
    password_url: str, db_url: URL, tmp_path: Any
) -> None:
    engine = create_engine(db_url, poolclass=NullPool)
    metadata = MetaData()
    table = queue_table("tbad_secret_jobs", metadata, Column("n", Integer), *retry_columns())
    metadata.create_all(engine)
    env = q4m_env(Q4M_URL=password_url, WORKER_TABLE=table.name, WORKER_LOG=str(tmp_path / "log"))
    try:
        runs = [
            run_q4m("enqueue", table.name, "--json", '{"n": 1}', env=env),
            run_q4m("stats", env=env),
            run_q4m("stats", "--json", env=env),
            run_q4m("dead", "list", env=env),
            run_q4m(
                "worker",
                "worker_jobs:RecordJob",
                "--burst",
                "--log-level",
                "DEBUG",
                env={**env, "Q4M_STATUS": "always"},
            ),
            run_q4m("worker", "worker_jobs:RecordJob", "--burst", "--url", password_url, env=env),
            run_q4m("worker", "worker_jobs:RecordJob", "--burst", "--processes", "2", env=env),
        ]
        for result in runs:
            assert "Traceback" not in result.stderr, result.stderr
            assert PASSWORD not in result.stdout + result.stderr, result.args
        assert [r.returncode for r in runs] == [0] * len(runs), [r.stderr for r in runs]
        assert count_rows(engine, table) == 0  # the worker ran the job
        assert "127.0.0.1" in runs[4].stderr  # the worker names its server: password hidden
    finally:
        metadata.drop_all(engine)
        engine.dispose()
