"""The HTML report as a real headless browser (Debian's chromium) shows it: the metrics on top,
then the groups in order with their counts, and every image drawn."""

import html
import json
import re
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
# After load: what is on screen, as JSON in <pre id=seen>. An image counts as drawn when its
# element has a size and the image its CSS names decodes to a picture.
WHAT_IS_SEEN = """<script>addEventListener('load', async () => {
  const top = el => el.getBoundingClientRect().top;
  const tables = [...document.querySelectorAll('table')];
  const thumbs = [...document.querySelectorAll('.thumb')];
  const drawn = await Promise.all(thumbs.map(el => new Promise(done => {
    const url = getComputedStyle(el).backgroundImage.slice(5, -2);  // url("...")
    const img = new Image();
    img.onload = () => done(img.naturalWidth > 0 && el.offsetWidth > 0);
    img.onerror = () => done(false);
    img.src = url; })));
  const seen = {
    headings: [...document.querySelectorAll('h2')].map(h => h.innerText),
    summaryAboveGroups: top(tables[0]) < top(document.querySelectorAll('h2')[1]),
    summary: [...tables[0].rows].map(r => [...r.cells].map(c => c.innerText)),
    groupRows: tables.slice(1).map(t => [t.className, t.rows.length - 1]),
    drawn: drawn.filter(Boolean).length + ' of ' + thumbs.length};
  const pre = document.createElement('pre');
  pre.id = 'seen';
  pre.textContent = JSON.stringify(seen);
  document.body.append(pre); });</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_groups_summary_and_images_in_chromium(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 20), (80 * i, 40, 0)).save(tmp_path / f"{i}.png")
    verdicts = [(True, True), (False, True), (True, False), (False, False), (True, True)]
    # correct, fixed, regression, failure, correct: five questions on three images
    rows = [Row(tmp_path / f"{i % 3}.png", f"q{i}", ["ref"], {"base": ("ref", b), "a": ("x", a)})
            for i, (b, a) in enumerate(verdicts)]
    scores = {"base": {"exact_match": 0.6}, "a": {"exact_match": 0.6}}
    page = write_html(rows, tmp_path / "report.html", "check", scores)
    page.write_text(page.read_text() + WHAT_IS_SEEN)
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"<pre id=\"seen\">(.*?)</pre>", dom)
    assert found, dom[-2000:]
    seen = json.loads(html.unescape(found[1]))
    assert [re.sub(r":.*\(", " (", h) for h in seen["headings"]] == [
        "Summary", "Regressions (1)", "Failures (1)", "Fixed (1)", "Correct (2)"]
    assert seen["summaryAboveGroups"]
    assert seen["summary"] == [["metric", "base", "a", "Δ a"],
                               ["exact_match", "0.6000", "0.6000", "+0.0000"]]
    assert seen["groupRows"] == [["regressions", 1], ["failures", 1], ["fixed", 1],
                                 ["correct", 2]]
    assert seen["drawn"] == "5 of 5"
