"""The HTML report as a person sees it: headless Chromium (Debian `chromium`) renders report.html to a
screenshot; the summary tiles, the failed case's red marks and the matrix must be visible on the first screen.

Robust under parallel load (pytest-xdist, other guests on the CPU) by waiting for conditions, not for time: each
screenshot is a fresh file from a Chromium with its own profile directory (a profile still locked by the previous
browser's exiting processes made the second run hand its work to that dying instance and leave the old picture in
place), taken only after every compositor stage of the frame has run and the page's virtual time budget has
elapsed with the page idle (virtual time advances only when nothing is pending, so a slow machine waits longer in
real time and sees the same picture), and the browser's exit status is checked."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from lab.report import write_all
from tests.test_lab_report import _report

RED, GREEN, ORANGE = (0xC6, 0x28, 0x28), (0x2E, 0x7D, 0x32), (0xEF, 0x6C, 0x00)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("no headless browser: install the Debian package chromium (apt-get install -y chromium)")


def _count(image, colour, region) -> int:
    data = image.crop(region).tobytes()   # RGB, 3 bytes a pixel
    return sum(1 for i in range(0, len(data), 3) if all(abs(data[i + k] - colour[k]) <= 6 for k in range(3)))


def _screenshot(page, shot, profile) -> None:
    """Render ``page`` (a file) at 1280×1000 into ``shot`` (PNG); fails the test with Chromium's last words when
    no new picture was written."""
    shot.unlink(missing_ok=True)
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
                           f"--user-data-dir={profile}", "--window-size=1280,1000", f"--screenshot={shot}",
                           page.as_uri()], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and shot.is_file(), f"chromium exited {proc.returncode}: {proc.stderr[-500:]}"


def test_report_page_shows_verdicts_at_a_glance(tmp_path):
    from PIL import Image

    directory = tmp_path / "report"
    write_all(_report(), directory)
    shot = tmp_path / "shot.png"
    _screenshot(directory / "report.html", shot, tmp_path / "profile-styled")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1000)
    top = (0, 0, 1280, 200)            # the summary tiles: one per verdict, in its colour
    assert _count(image, GREEN, top) > 2000 and _count(image, RED, top) > 2000 and _count(image, ORANGE, top) > 2000
    below = (0, 200, 1280, 1000)       # matrix badges and the open failed case's red border and badge
    assert _count(image, RED, below) > 500
    assert _count(image, GREEN, below) > 300
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50           # text was drawn, not an empty or error page

    # a broken page (no styles) is told apart: the same check fails on it
    (directory / "report.html").write_text((directory / "report.html").read_text().replace("<style>", "<style>/*")
                                           .replace("</style>", "*/</style>"))
    _screenshot(directory / "report.html", shot, tmp_path / "profile-unstyled")
    unstyled = Image.open(shot).convert("RGB")
    assert _count(unstyled, RED, top) < 100
    assert len(unstyled.getcolors(maxcolors=1 << 20)) > 2  # the page was drawn (text), only without its colours
