"""The HTML report as a person sees it: headless Chromium (Debian `chromium`) renders report.html to a
screenshot; the summary tiles, the failed case's red marks and the matrix must be visible on the first screen."""
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


def test_report_page_shows_verdicts_at_a_glance(tmp_path):
    from PIL import Image

    directory = tmp_path / "report"
    write_all(_report(), directory)
    shot = tmp_path / "shot.png"
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000",
                           f"--screenshot={shot}", (directory / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-500:]
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
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000", f"--screenshot={shot}",
                    (directory / "report.html").as_uri()], capture_output=True, timeout=180)
    assert _count(Image.open(shot).convert("RGB"), RED, top) < 100
