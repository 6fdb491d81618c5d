"""Render a page in headless Chromium: a PNG screenshot, or the DOM after its scripts ran.

Used by the browser tests and to make the pictures in docs/:

    .venv/bin/python docs/screenshot.py docs/reports/smollm2-135m/report.html docs/images/report-smollm2.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

# No sandbox (root in containers), no GPU, and no background connections: this machine's network is closed.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def find_chromium() -> str | None:
    """Path of a Chromium or Chrome binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("no chromium found; install Debian's chromium package (make browser)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


def dump_dom(page: Path, *, budget_ms: int = 20000, timeout: float = 120) -> tuple[str, str]:
    """(DOM after the page's scripts ran, Chromium's log with console messages)."""
    res = _run(["--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", "--dump-dom",
                page.resolve().as_uri()], timeout)
    return res.stdout, res.stderr


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 2200, budget_ms: int = 20000,
               timeout: float = 120) -> Path:
    """Save a ``width`` x ``height`` screenshot of ``page`` to ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    res = _run([f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
                f"--screenshot={png.resolve()}", page.resolve().as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium made no screenshot: {res.stderr[-500:]}")
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2200)
    args = ap.parse_args()
    print(screenshot(args.page, args.png, width=args.width, height=args.height))


if __name__ == "__main__":
    main()
