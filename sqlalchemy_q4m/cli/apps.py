"""``q4m web`` and ``q4m demo``: the commands that start the dashboard or the demo (each
imported on use: the web extra may not be installed)."""

from __future__ import annotations

import argparse

from ..exc import Q4MError
from .connect import probe
from .options import flag_env

__all__ = ["cmd_demo", "cmd_web"]


def cmd_web(args: argparse.Namespace) -> int:
    try:
        from ..web import serve
    except ImportError as err:
        raise Q4MError(f"q4m web needs: pip install 'sqlalchemy-q4m[web]' ({err})") from None
    read_only = bool(args.read_only) or flag_env("Q4M_WEB_READ_ONLY")
    probe(args.url)
    return serve(
        args.url,
        host=args.host,
        port=args.port,
        token=args.token,
        basic_auth=args.basic_auth,
        read_only=read_only,
        dead_table=args.dead_table,
        refresh=args.refresh,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    probe(args.url)
    return run_demo(
        url=args.url,
        jobs=args.jobs,
        concurrency=args.concurrency,
        processes=args.processes,
        table=args.table,
        dead_table=args.dead_table,
    )
