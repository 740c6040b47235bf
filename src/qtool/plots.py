"""Figures people read faster than tables: the per-layer quantization error of a
checkpoint by block and linear (``qtool inspect --plot``), and the per-window perplexity
and KL divergence of every model of a ``qtool eval`` run (``qtool eval --plot``).

matplotlib's object API only (``matplotlib.figure.Figure``, no pyplot): no GUI backend,
no global figure state, safe on a headless machine. Each ``*_figure`` function returns
the Figure, whose lines hold exactly the numbers of ``qtool.json`` or the eval result;
``save_figure`` writes it as PNG or SVG, ``figure_bytes`` gives the bytes.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from qtool.errors import UserInputError
from qtool.layer_error import LABELS, OUTPUT_KEY, WEIGHT_KEY

PLOT_SUFFIXES = (".png", ".svg")
BLOCK = re.compile(r"^.*?\.(\d+)\.(.+)$")  # model.layers.3.self_attn.q_proj -> (3, self_attn.q_proj)


def check_plot_path(path: str | Path, option: str = "--plot", suffixes: tuple[str, ...] = PLOT_SUFFIXES) -> Path:
    """Refuse, before any work, a file name whose type is not one of ``suffixes`` or whose
    folder does not exist."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in suffixes:
        raise UserInputError(f"{option} {path}: the file must end in {' or '.join(suffixes)}; "
                             f"e.g. {option} {path.with_suffix(suffixes[0]).name}")
    if not path.resolve().parent.is_dir():
        raise UserInputError(f"{option} {path}: the folder {path.resolve().parent} does not exist: create it first")
    return path


def _figure(rows: int):
    """A figure of ``rows`` panels stacked, each with integer x ticks (blocks, windows)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3.6 * rows), layout="constrained")
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def layer_series(layers: dict[str, dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """``linear -> (block indices, values of key)`` for every layer that records ``key``,
    in natural layer order (blocks ascending; linears as they first appear). A name
    without a block index is its own linear at block 0."""
    from qtool.summary import natural_key

    series: dict[str, tuple[list[int], list[float]]] = {}
    for name in sorted(layers, key=natural_key):
        if key not in layers[name]:
            continue
        found = BLOCK.match(name)
        block, linear = (int(found.group(1)), found.group(2)) if found else (0, name)
        blocks, values = series.setdefault(linear, ([], []))
        blocks.append(block)
        values.append(float(layers[name][key]))
    return series


def has_layer_errors(record: dict) -> bool:
    """Whether any layer of the ``qtool.json`` ``record`` records a relative error."""
    return any(k in s for s in (record.get("layers") or {}).values() for k in (OUTPUT_KEY, WEIGHT_KEY))


def layer_error_figure(record: dict, title: str | None = None):
    """Per-layer relative error in % of the checkpoint whose ``qtool.json`` is ``record``:
    one panel per error recorded (output error, then weight error), x = block index, one
    line per linear of a block. Raises ``UserInputError`` when no layer records an error."""
    layers = record.get("layers") or {}
    keys = [k for k in (OUTPUT_KEY, WEIGHT_KEY) if any(k in s for s in layers.values())]
    if not has_layer_errors(record):
        raise UserInputError("this checkpoint records no per-layer error (written before qtool recorded "
                             "rel_weight_error_pct): nothing to plot; quantize it again with this qtool")
    fig, axes = _figure(len(keys))
    cfg = record.get("config") or {}
    fig.suptitle(title or f"{(record.get('model') or {}).get('source', 'checkpoint')}: "
                 f"{str(cfg.get('method', '')).upper()} {cfg.get('bits', '')}-bit, group {cfg.get('group_size', '')}, "
                 f"{record.get('format', '')}")
    for ax, key in zip(axes, keys):
        for linear, (blocks, values) in layer_series(layers, key).items():
            ax.plot(blocks, values, marker="o", markersize=3, linewidth=1.2, label=linear)
        ax.set_xlabel("decoder block")
        ax.set_ylabel(f"{LABELS[key]} (%)")
        ax.set_title(f"{LABELS[key]} per layer ({key})", fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
    return fig


def short_names(names: list[str]) -> list[str]:
    """Legend labels: the last path component of each name, or the whole name where two
    would read the same."""
    short = [Path(n).name or n for n in names]
    return [s if short.count(s) == 1 else n for s, n in zip(short, names)]


def eval_figure(result: dict):
    """Per-window perplexity of every model of a ``qtool eval`` result (and of the
    baseline, dashed), and with a baseline a second panel with every model's per-window
    mean KL divergence from it; x = window index. Lines in the order of
    ``result["results"]``, the baseline's first."""
    base = result.get("baseline")
    rows = result["results"]
    fig, axes = _figure(2 if base else 1)
    fig.suptitle(f"qtool eval: {result['protocol']['dataset']}, {result['protocol']['windows']} windows of "
                 f"{result['protocol']['seqlen']} tokens")
    labels = short_names([r["model"] for r in rows])
    ax = axes[0]
    if base:
        ax.plot(range(len(base["window_ppl"])), base["window_ppl"], color="black", linestyle="--", linewidth=1.2,
                label=f"{short_names([base['model']])[0]} (baseline)")
    for r, label in zip(rows, labels):
        ax.plot(range(len(r["window_ppl"])), r["window_ppl"], marker=".", linewidth=1.2, label=label)
    ax.set_ylabel("perplexity of the window")
    ax.set_title("perplexity per window (lower is better)", fontsize="medium")
    if base:
        kl = axes[1]
        for r, label in zip(rows, labels):
            kl.plot(range(len(r["window_kl"])), r["window_kl"], marker=".", linewidth=1.2, label=label)
        kl.set_ylabel("mean KL (nats / token)")
        kl.set_title("KL divergence from the baseline per window (0 = identical)", fontsize="medium")
    for a in axes:
        a.set_xlabel("window")
        a.grid(True, alpha=0.3)
        a.legend(fontsize="small")
    return fig


def figure_bytes(fig, fmt: str = "png") -> bytes:
    """The figure as ``png`` or ``svg`` bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=110)
    return buffer.getvalue()


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (its suffix picks PNG or SVG)."""
    path = check_plot_path(path)
    path.write_bytes(figure_bytes(fig, path.suffix.lower().lstrip(".")))
    return path
