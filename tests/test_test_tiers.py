"""The rules of the test tiers (``tests/conftest.py``), checked on the suite itself in a
subprocess: without ``Q4M_TEST_URL`` the native tier skips, summed up in one line that says
how to get a Q4M server; where native tests are required (``CI=true``, as on CI, or
``Q4M_REQUIRE_NATIVE=1``, set by ``.ci/test`` when it started the Q4M engine) that skip is a
failure.  The subprocess gets an unreachable server: skipping needs none.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "mysql+pymysql://root@127.0.0.1:1"


def native_tier(**env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in {"Q4M_TEST_URL", "Q4M_TEST_DBURI", "CI", "Q4M_REQUIRE_NATIVE"}
    }
    environ.update(env)
    args = ["-m", "native", "-p", "no:cacheprovider", "--dburi", UNREACHABLE, "-q", "tests"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def counted(outcome: str, output: str) -> int:
    found = re.search(rf"(\d+) {outcome}", output.splitlines()[-1])
    return int(found.group(1)) if found else 0


def test_without_a_q4m_server_the_native_tier_skips_in_one_line() -> None:
    result = native_tier()
    assert result.returncode == 0, result.stdout[-3000:]
    skipped = counted("skipped", result.stdout)
    assert skipped > 1
    lines = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"SKIPPED [{skipped}] ")
    assert "Q4M_TEST_URL is not set" in lines[0]
    assert "docker compose up -d --wait q4m" in lines[0]


@pytest.mark.parametrize(
    "env", [{"CI": "true"}, {"CI": "false", "Q4M_REQUIRE_NATIVE": "1"}], ids=["ci", "required"]
)
def test_where_native_tests_are_required_a_skip_is_a_failure(env: dict[str, str]) -> None:
    result = native_tier(**env)
    assert result.returncode == 1, result.stdout[-3000:]
    assert counted("skipped", result.stdout) == 0
    assert counted("errors?", result.stdout) > 1
    assert "a native test skipped where native tests are required" in result.stdout
