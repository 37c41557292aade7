"""The HTML report renders its images in a real headless browser (Debian's chromium)."""

import shutil
import subprocess

import pytest
from PIL import Image

from evaluation.report import Row, write_html

CHROMIUM = shutil.which("chromium")
# Flags of a quiet headless start on a machine without network access.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000", "--dump-dom"]
COUNT_RENDERED = """<script>addEventListener('load', () => {
  const imgs = [...document.images];
  document.title = 'rendered ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length
                   + ' of ' + imgs.length; });</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_images_render_in_chromium(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 20), (80 * i, 40, 0)).save(tmp_path / f"{i}.png")
    rows = [Row(tmp_path / f"{i}.png", "", ["ref"], {"base": ("ref", i > 0), "a": ("ref", True)})
            for i in range(3)]
    page = write_html(rows, tmp_path / "report.html", "check")
    page.write_text(page.read_text() + COUNT_RENDERED)
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<title>rendered 3 of 3</title>" in dom
