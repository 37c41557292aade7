"""Pictures of an evaluation: a self-contained HTML page and a PNG contact sheet.

Each row is one test query: the image, its reference(s), and every system's output marked
right or wrong. What went wrong comes first: rows are grouped as regressions (the base right,
an adapter wrong), failures (an adapter wrong, the base too), fixed (the base wrong, every
adapter right), correct; each heading carries its count. The page opens with the metrics of
every system. Each image is embedded once, as base64 PNG in one CSS class that every query on
it uses (a VQA set asks several questions per image), so the page is one file that opens
anywhere, without scripts.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# Group key -> heading; the order is the page's and the contact sheet's.
GROUPS = {"regressions": "Regressions: base right, an adapter wrong",
          "failures": "Failures: an adapter wrong, the base too",
          "fixed": "Fixed: base wrong, every adapter right",
          "correct": "Correct: all right"}
STYLE = ("body{font-family:sans-serif}td,th{vertical-align:top;padding:4px;text-align:left}"
         ".ok{color:#070}.bad{color:#b00}.scores td+td{text-align:right}"
         ".thumb{display:inline-block;background:center/contain no-repeat}")


@dataclass
class Row:
    """One test query and what each system answered."""

    image: Path
    query: str  # the question, or "" for captioning
    references: list[str]
    outputs: dict[str, tuple[str, bool]]  # system -> (text, right?); "base" is one of them

    def group(self) -> str:
        """Which of GROUPS the row belongs to. Without adapters the base is judged alone."""
        base_ok = self.outputs["base"][1]
        adapters_ok = [ok for s, (_, ok) in self.outputs.items() if s != "base"] or [base_ok]
        if all(adapters_ok):
            return "correct" if base_ok else "fixed"
        return "regressions" if base_ok else "failures"


def grouped(rows: list[Row]) -> dict[str, list[Row]]:
    """The rows of each group, in GROUPS order (stable within a group)."""
    groups: dict[str, list[Row]] = {g: [] for g in GROUPS}
    for r in rows:
        groups[r.group()].append(r)
    return groups


def score_table(scores: dict[str, dict[str, float]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a metrics table: a column per system, then the delta of each adapter
    to the base; ``scores`` is {system: {metric: value}} with "base" first."""
    systems = list(scores)
    header = ["metric", *systems, *(f"Δ {s}" for s in systems[1:])]
    rows = [[m, *(f"{scores[s][m]:.4f}" for s in systems),
             *(f"{scores[s][m] - scores['base'][m]:+.4f}" for s in systems[1:])]
            for m in scores["base"]]
    return header, rows


def _thumbnail_b64(path: Path, size: int) -> str:
    """The image as base64 PNG, shrunk to fit size x size (never enlarged: the page scales it,
    and a 64 px image upsampled to 96 px takes ~3x the bytes)."""
    image = Image.open(path).convert("RGB")
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _td(cells: list[str]) -> str:
    """Already-escaped cells as a row of <td>."""
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _table(header: list[str], body: list[str], css_class: str) -> str:
    """An HTML table: escaped header cells and <tr> rows."""
    head = "".join(f"<th>{h}</th>" for h in header)
    return f"<table class='{css_class}'><tr>{head}</tr>{''.join(body)}</table>"


def _summary(scores: dict[str, dict[str, float]], groups: dict[str, list[Row]]) -> str:
    header, rows = score_table(scores)
    table = _table([html.escape(h) for h in header],
                   [_td([html.escape(c) for c in r]) for r in rows], "scores")
    counts = " · ".join(f"<a href='#{g}'>{g} {len(members)}</a>" for g, members in groups.items())
    return f"<h2 id='summary'>Summary</h2>{table}<p>{counts}</p>"


def _query_row(r: Row, image_class: str, image_px: int) -> str:
    thumb = (f"<span class='thumb {image_class}' role='img' "
             f"aria-label='{html.escape(r.image.name)}' "
             f"style='width:{image_px}px;height:{image_px}px'></span>")
    refs = "<br>".join(map(html.escape, r.references))
    outputs = "".join(f"<td class='{'ok' if ok else 'bad'}'>{'✓' if ok else '✗'} "
                      f"{html.escape(t)}</td>" for t, ok in r.outputs.values())
    return f"<tr><td>{thumb}</td><td>{html.escape(r.query)}</td><td>{refs}</td>{outputs}</tr>"


def write_html(rows: list[Row], path: Path, title: str, scores: dict[str, dict[str, float]],
               image_px: int = 96) -> Path:
    """A single-file HTML report: the metrics ``scores`` ({system: {metric: value}}), then the
    rows grouped by GROUPS, each image embedded once."""
    groups = grouped(rows)
    image_class: dict[Path, str] = {}  # one class per image, numbered in page order
    for r in (r for members in groups.values() for r in members):
        image_class.setdefault(r.image, f"i{len(image_class)}")
    images_css = "".join(f".{c}{{background-image:url(data:image/png;base64,"
                         f"{_thumbnail_b64(image, image_px)})}}"
                         for image, c in image_class.items())
    header = ["image", "query", "reference", *map(html.escape, rows[0].outputs)]
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}{images_css}</style>", f"<h1>{html.escape(title)}</h1>",
             _summary(scores, groups)]
    for g, members in groups.items():
        parts.append(f"<h2 id='{g}'>{html.escape(GROUPS[g])} ({len(members)})</h2>")
        if members:
            parts.append(_table(header, [_query_row(r, image_class[r.image], image_px)
                                         for r in members], g))
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def write_contact_sheet(rows: list[Row], path: Path, columns: int = 6, image_px: int = 96,
                        max_rows: int = 60) -> Path:
    """A PNG grid of the first ``max_rows`` rows in GROUPS order (regressions and failures
    first): each tile is the image with each system's output, green right, red wrong."""
    rows = [r for members in grouped(rows).values() for r in members][:max_rows]
    line_h, n_lines = 12, 1 + len(rows[0].outputs)
    tile_w, tile_h = 2 * image_px + 16, image_px + line_h * n_lines + 8
    n_rows = -(-len(rows) // columns)
    sheet = Image.new("RGB", (columns * tile_w, n_rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        x, y = (i % columns) * tile_w, (i // columns) * tile_h
        sheet.paste(Image.open(r.image).convert("RGB").resize((image_px, image_px)), (x + 4, y + 4))
        draw.text((x + 4, y + image_px + 6), (r.query or r.references[0])[:40], fill="black")
        for j, (system, (text, ok)) in enumerate(r.outputs.items(), start=1):
            draw.text((x + 4, y + image_px + 6 + j * line_h), f"{system}: {text}"[:40],
                      fill=(0, 120, 0) if ok else (180, 0, 0))
    sheet.save(path)
    return path
