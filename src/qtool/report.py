"""``qtool eval --report FILE.html``: one self-contained HTML page to share an evaluation:
the protocol, the results table with what its columns mean, and the figures as PNG data
URIs (no file beside it, no script, nothing fetched)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from qtool import __version__

STYLE = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}tr.baseline{color:#555;font-style:italic}
figure{margin:1.5rem 0}img{max-width:100%;height:auto}figcaption,p.legend{color:#555;font-size:.9rem}"""


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _table(result: dict) -> list[str]:
    base = result.get("baseline")
    rows = ([("baseline", {**base, "model": f"{base['model']} (baseline)", "delta_ppl": 0.0, "kl_mean": 0.0,
                           "top1_agreement": 1.0})] if base else []) + [("", r) for r in result["results"]]
    head = ["model", "ppl", "Δ ppl", "mean KL", "top-1 agreement", "size on disk (MB)", "time (s)"]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    for cls, r in rows:
        cells = [r["model"], f"{r['ppl']:.3f}",
                 "–" if r.get("delta_ppl") is None else f"{r['delta_ppl']:+.3f}",
                 "–" if r.get("kl_mean") is None else f"{r['kl_mean']:.4f}",
                 "–" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.2f}%",
                 "–" if r.get("size_bytes") is None else f"{r['size_bytes'] / 1e6:.1f}",
                 f"{r['seconds']:.1f}"]
        out.append(f"<tr class=\"{cls}\">" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return out + ["</tbody>", "</table>"]


def render_report(result: dict, figures: list[tuple[str, bytes]]) -> str:
    """The HTML page of a ``qtool eval`` ``result`` (a table per dataset when it holds
    several); ``figures`` are ``(caption, PNG bytes)`` shown in order under the tables."""
    from qtool.evaluate import LEGEND_BASELINE, LEGEND_PPL, LEGEND_REST

    legend = " ".join((LEGEND_PPL, LEGEND_BASELINE if result.get("baseline") else "", LEGEND_REST))
    parts = ["<!doctype html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
             "<title>qtool eval report</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             "<h1>qtool eval report</h1>", f"<p>qtool {html.escape(__version__)}.</p>"]
    blocks = result.get("datasets") or [result]  # several datasets: one table each, under its name
    for b in blocks:
        parts += ([f"<h2>{html.escape(b['name'])}</h2>"] if len(blocks) > 1 else []) + [
            f"<p>Protocol: {html.escape(b['protocol']['description'])}.</p>", *_table(b)]
    parts.append(f"<p class=\"legend\">{html.escape(legend)}</p>")
    for caption, png in figures:
        parts += ["<figure>", f"<img src=\"{data_uri(png)}\" alt=\"{html.escape(caption)}\">",
                  f"<figcaption>{html.escape(caption)}</figcaption>", "</figure>"]
    return "\n".join(parts + ["</body>", "</html>"]) + "\n"


def write_report(path: str | Path, result: dict, figures: list[tuple[str, bytes]]) -> Path:
    path = Path(path)
    path.write_text(render_report(result, figures), encoding="utf-8")
    return path
