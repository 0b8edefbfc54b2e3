"""The command line's options and their checks: each option's default comes from a ``Q4M_…``
environment variable named in ``--help``; a bad value is a one-line error (exit code 2)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NoReturn

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.exc import NoSuchModuleError

from ..exc import OptionError
from ..exc import Q4MError
from ..schema.checks import check_seconds
from ..worker.deadletter import DEAD_LETTER_TABLE
from ..worker.runtime import EXIT_USAGE

__all__ = [
    "DEFAULT_URL",
    "Parser",
    "check_level",
    "dead_table_option",
    "env_default",
    "flag_env",
    "id_list",
    "level_name",
    "option",
    "port_number",
    "positive_int",
    "positive_seconds",
    "seconds_value",
    "switch",
    "url_option",
]

DEFAULT_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (``q4m: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def env_default(name: str, default: Any) -> Any:
    return os.environ.get(name, default)


def flag_env(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise Q4MError(f"environment variable {name}={raw!r}: use 1/0, true/false, yes/no")


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {number}")
    return number


def seconds_value(value: str, positive: bool = False) -> float:
    """A number of seconds, checked as the library checks its own (no NaN, infinity or
    negative)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    try:
        checked = check_seconds("the option", number, positive=positive)
    except OptionError as err:
        raise argparse.ArgumentTypeError(str(err).replace("the option ", "")) from None
    assert checked is not None
    return checked


def port_number(value: str) -> int:
    number = positive_int(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {number}")
    return number


def positive_seconds(value: str) -> float:
    return seconds_value(value, positive=True)


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    """argparse checks ``choices`` on the command line only; as a ``type`` the check also
    applies to a default taken from the environment."""

    def check(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {value!r} (choose from {', '.join(choices)})"
            )
        return value

    return check


def level_name(value: str) -> str:
    try:
        check_level(value)
    except Q4MError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _database_url(value: str) -> str:
    """A MySQL/MariaDB URL whose driver is installed; errors never show its password."""
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise argparse.ArgumentTypeError(
            "bad database URL: cannot parse it (dialect+driver://user:password@host/database)"
        ) from None
    safe = url.render_as_string(hide_password=True)
    if url.get_backend_name() not in ("mysql", "mariadb"):
        raise argparse.ArgumentTypeError(
            f"bad database URL {safe}: sqlalchemy-q4m needs MySQL or MariaDB"
        )
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise argparse.ArgumentTypeError(
            f"bad database URL {safe}: unknown driver {url.get_driver_name()!r}"
        ) from None
    except ImportError as err:
        raise argparse.ArgumentTypeError(
            f"bad database URL {safe}: its driver is not installed ({err})"
        ) from None
    charset = url.query.get("charset")
    if charset is not None and not _known_charset(charset):
        raise argparse.ArgumentTypeError(f"bad database URL {safe}: unknown charset {charset!r}")
    return value


def _known_charset(name: Any) -> bool:
    """Whether MySQL knows character set ``name`` (PyMySQL's table of them)."""
    from pymysql.charset import charset_by_name

    return isinstance(name, str) and charset_by_name(name) is not None


def option(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    help: str,
    *,
    default: Any = None,
    type: Callable[[str], Any] | None = None,
    **kw: Any,
) -> None:
    """An option whose default comes from ``env`` (named in the help text)."""
    text = f"{help} [env {env}" + (f"; default {default}]" if default is not None else "]")
    if type is None and "choices" in kw:
        type = _choice(kw["choices"])
    if type is not None:  # argparse applies it to a string default (the environment's) too
        kw["type"] = type
    parser.add_argument(flag, default=env_default(env, default), help=text, **kw)


def id_list(raw: str) -> list[int] | None:
    """``Q4M_DEAD_ID=3,4`` -> ``[3, 4]``; empty -> None (all)."""
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        return None
    try:
        return [positive_int(p) for p in parts]
    except argparse.ArgumentTypeError as err:
        raise Q4MError(f"environment variable Q4M_DEAD_ID={raw!r}: {err}") from None


def switch(parser: argparse.ArgumentParser, flag: str, env: str, help: str) -> None:
    parser.add_argument(flag, action="store_true", default=None, help=f"{help} [env {env}=1]")


def url_option(parser: argparse.ArgumentParser) -> None:
    option(parser, "--url", "Q4M_URL", "database URL", default=DEFAULT_URL, type=_database_url)


def dead_table_option(parser: argparse.ArgumentParser) -> None:
    option(
        parser,
        "--dead-table",
        "Q4M_DEAD_TABLE",
        "dead-letter table name",
        default=DEAD_LETTER_TABLE,
    )


def check_level(level: str) -> None:
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise Q4MError(f"unknown log level {level!r}")
