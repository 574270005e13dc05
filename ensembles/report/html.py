"""report.html: one self-contained, printable page per run or evaluation.

The page is report.md rendered to HTML (python-markdown, tables extension) with every figure
embedded as a base64 PNG beside the section it illustrates (confusion matrix, ROC, reliability,
learning curves), a gallery of correctly and wrongly classified test images (Grad-CAM overlays
where the model allows them), and the source-confounding caveat at the top. Nothing is loaded
from outside the file, so it can be mailed, archived or printed as it is.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from collections.abc import Sequence
from pathlib import Path

import markdown
import numpy as np
from PIL import Image

from data_pipeline.atomic import atomic_write

CAVEAT = (
    "**Caveat: class may be confounded with source.** Public chest X-ray collections often "
    "take each class from other hospitals, scanners and age groups (for example pediatric "
    "pneumonia beside adult COVID-19), and copy images from each other. A model can score well "
    "by recognising a hospital, a child or a text marker rather than a disease. Read these "
    "figures with the data's provenance in mind: prefer patient-grouped splits, check the "
    "leakage section, and treat evaluation on another source as the honest measure. Not for "
    "clinical use.")

# figure file -> the report.md section (heading prefix) it is placed after
FIGURES = {"confusion.png": "Confusion matrix", "roc.png": "ROC-AUC",
           "reliability.png": "Calibration", "curves.png": "Members"}
WIDE = {"curves.png"}           # shown at the page's width; the others at most 520 px

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 max-width:1100px;margin:2em auto;padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #444;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:left}
th{background:#eee}
.wide{overflow-x:auto}
img.figure{max-width:min(100%,520px);height:auto;display:block;margin:.6em 0}
img.figure.wide{max-width:100%}
.caveat{background:#fff6dd;border-left:5px solid #d9a400;padding:.6em 1em;margin:1em 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.tile{border:3px solid #2e7d32;padding:3px;margin:0;font-size:.8em;break-inside:avoid}
.tile.wrong{border-color:#c62828}
.tile img{width:100%;height:auto;display:block;image-rendering:pixelated}
blockquote{background:#fde8e8;border-left:5px solid #c62828;margin:1em 0;padding:.4em 1em}
@media print{body{max-width:none;margin:0}h2{break-after:avoid}img.figure{max-width:80%}
 .gallery{grid-template-columns:repeat(4,1fr)}}
"""


@dataclasses.dataclass(frozen=True)
class Tile:
    """One gallery image: RGB uint8 [H, W, 3], its caption, and whether the decision was
    right (None: the true class is unknown)."""

    image: np.ndarray
    caption: str
    correct: bool | None


def png_data_uri(image: np.ndarray | bytes) -> str:
    """A data: URI of PNG bytes, or of a uint8 image encoded as PNG."""
    if not isinstance(image, bytes):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
        image = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def _with_figures(report_md: str, out_dir: Path) -> str:
    """report.md with each existing figure's image appended to the section it illustrates."""
    parts = report_md.split("\n## ")
    for name, heading in FIGURES.items():
        path = out_dir / name
        if not path.is_file():
            continue
        for i in range(1, len(parts)):
            if parts[i].startswith(heading):
                kind = "figure wide" if name in WIDE else "figure"
                parts[i] = (parts[i].rstrip("\n") + f"\n\n<img class=\"{kind}\" alt=\"{name}\" "
                            f"src=\"{png_data_uri(path.read_bytes())}\">\n")
                break
    return "\n## ".join(parts)


def _gallery(tiles: Sequence[Tile], note: str) -> str:
    if not tiles:
        return ""
    groups = [("Wrongly classified", [t for t in tiles if t.correct is False]),
              ("Correctly classified", [t for t in tiles if t.correct is True]),
              ("Images", [t for t in tiles if t.correct is None])]
    out = ["<h2>Test images</h2>", f"<p>{html.escape(note)}</p>"]
    for heading, group in groups:
        if not group:
            continue
        out.append(f"<h3>{heading} ({len(group)} shown)</h3><div class=\"gallery\">")
        for t in group:
            cls = "tile wrong" if t.correct is False else "tile"
            out.append(f"<figure class=\"{cls}\"><img alt=\"{html.escape(t.caption)}\" "
                       f"src=\"{png_data_uri(t.image)}\"><figcaption>"
                       f"{html.escape(t.caption)}</figcaption></figure>")
        out.append("</div>")
    return "\n".join(out)


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


def render(report_md: str, out_dir: str | Path, *, title: str, tiles: Sequence[Tile] = (),
           gallery_note: str = "") -> str:
    """The whole report page as one string."""
    body_md = _with_figures(report_md, Path(out_dir))
    first, _, rest = body_md.partition("\n## ")
    return _page(title, markdown.markdown(first, extensions=["tables"])
                 + f"<div class=\"caveat\">{markdown.markdown(CAVEAT)}</div>"
                 + (markdown.markdown("## " + rest, extensions=["tables"]) if rest else "")
                 + _gallery(tiles, gallery_note))


def _write_text(path: Path, text: str) -> Path:
    """Write `text` whole or not at all (data_pipeline.atomic)."""
    with atomic_write(path, encoding="utf-8") as fh:
        fh.write(text)
    return path


def write_html(out_dir: str | Path, report_md: str, *, title: str, tiles: Sequence[Tile] = (),
               gallery_note: str = "") -> Path:
    """Write out_dir/report.html: report.md with its figures, the caveat and the gallery."""
    out = Path(out_dir)
    return _write_text(out / "report.html", render(report_md, out, title=title, tiles=tiles,
                                                     gallery_note=gallery_note))


def write_predictions_page(path: str | Path, table: Sequence[Sequence[str]],
                           tiles: Sequence[Tile], *, title: str, notes: Sequence[str]) -> Path:
    """A self-contained page for predictions without labels: the notes, the caveat, every
    row of `table` (its first row the header) and one overlay tile per row."""
    head, *rows = table
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    page = (f"<h1>{html.escape(title)}</h1><ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
            + f"<div class=\"caveat\">{markdown.markdown(CAVEAT)}</div>"
            + f"<h2>Predictions</h2><div class=\"wide\"><table><tr>{cells}</tr>{body}</table></div>"
            + _gallery(tiles, "Grad-CAM of the ensemble's decision over each image as the model "
                              "saw it, in the table's order."))
    return _write_text(Path(path), _page(title, page))


def tile_caption(true_name: str | None, pred_name: str, probability: float) -> str:
    """`true covid -> pred normal (0.81)` (without the first part when the truth is unknown)."""
    return (f"true {true_name} -> " if true_name else "") + f"pred {pred_name} ({probability:.2f})"
