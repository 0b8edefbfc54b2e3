"""Take the README's screenshots of a running dashboard (``q4m web``) with Debian's Chromium.

    python docs/screenshots.py --web http://127.0.0.1:8080 --token "$Q4M_WEB_TOKEN" --out docs

Saves ``overview.png`` (the overview page) and ``dead-letter.png`` (the first dead letter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--web", default="http://127.0.0.1:8080")
    parser.add_argument("--token", default="")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    out = Path(args.out)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        if args.token:
            page.goto(args.web + "/login")
            page.fill("input[name=token]", args.token)
            page.click("button[type=submit]")
            page.wait_for_url(args.web + "/")
        page.goto(args.web + "/")
        page.screenshot(path=str(out / "overview.png"), full_page=True)
        page.goto(args.web + "/dead")
        page.click("#dead a[href*='/dead/']")
        page.wait_for_selector("#error")
        page.screenshot(path=str(out / "dead-letter.png"), full_page=True)
        browser.close()
    print(f"saved {out / 'overview.png'} and {out / 'dead-letter.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
