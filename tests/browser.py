"""Headless Chromium for the UI tests and the UI benchmark: Debian's chromium driven by
Playwright for Python (Playwright's own browser download is not used)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "src" / "deeptrace" / "server" / "web"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def chromium_path() -> str | None:
    if os.environ.get("DEEPTRACE_CHROMIUM"):
        return os.environ["DEEPTRACE_CHROMIUM"]
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_unavailable_reason() -> str | None:
    """Why no browser can be driven here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the UI needs Playwright for Python to be driven (pip install -e '.[test]')"
    path = chromium_path()
    if path is None or not Path(path).exists():
        return (f"the UI needs Chromium to be driven: {path or '/usr/bin/chromium'} not found "
                "(apt-get install chromium, or set DEEPTRACE_CHROMIUM to its path)")  # fmt: skip
    if not (WEB / "node_modules" / "cytoscape" / "dist" / "cytoscape.min.js").exists():
        return f"the web UI's libraries are not installed: run `npm ci --prefix {WEB.relative_to(ROOT)}`"
    return None


@contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
