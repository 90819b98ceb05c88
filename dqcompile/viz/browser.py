"""Headless Chromium on the graph page: the page's DOM after its script ran, or a screenshot.

Used by the browser test and by `dqcompile viz --screenshot`. Chromium runs with a fresh profile, no
sandbox (containers), no GPU, and no background network traffic (the page needs none).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)
TIMEOUT_S = 120


def chromium_path() -> str | None:
    """The Chromium executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def page_url(html_path: str | Path, fragment: str = "") -> str:
    """file:// URL of the page, with a fragment such as "search=to_q" (see the page's script)."""
    url = Path(html_path).resolve().as_uri()
    return f"{url}#{fragment}" if fragment else url


def _run(url: str, *extra: str) -> subprocess.CompletedProcess:
    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError("headless Chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="dqcompile-chromium-") as profile:
        return subprocess.run(
            [executable, *FLAGS, f"--user-data-dir={profile}", *extra, url],
            check=True, capture_output=True, timeout=TIMEOUT_S,
        )


def dump_dom(url: str, window: tuple[int, int] = (1400, 900)) -> str:
    """The page's DOM as HTML after its scripts ran."""
    return _run(url, f"--window-size={window[0]},{window[1]}", "--dump-dom").stdout.decode("utf-8")


def screenshot(url: str, png_path: str | Path, window: tuple[int, int] = (1400, 900)) -> Path:
    """A PNG of the page's first screen (window pixels)."""
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run(url, f"--window-size={window[0]},{window[1]}", f"--screenshot={png}")
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot to {png}")
    return png
