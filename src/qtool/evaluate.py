"""``qtool eval``: several models or checkpoints on the same token windows, side by side:
perplexity, difference to a float baseline, mean KL divergence from the baseline's
next-token distribution and top-1 agreement with it, size on disk, time.

All models are loaded once and the windows are visited one at a time; for each window the
baseline's log-probabilities are computed once and compared with every model's, so no
``[tokens, vocab]`` tensor for the whole set ever exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import textwrap
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from qtool.errors import UserInputError
from qtool.eval import EvalSource, check_seqlen, protocol, protocol_dict, resolve_eval_dataset, tokenize_rows, window_logprobs, windows
from qtool.io import read_qtool_json
from qtool.loading import DEFAULT_MODEL_NAME
from qtool.textsets import canonical, check_no_overlap

log = logging.getLogger(__name__)

BUILTIN_NAME = DEFAULT_MODEL_NAME
BUILTIN_NOTE = ("the built-in model: float32 weights de-quantized from the Q4_1 GGUF it ships as, "
                "so they already lie on a 4-bit grid")
LEGEND_PPL = "ppl: perplexity, exp(mean negative log-likelihood per predicted token), lower is better."
LEGEND_BASELINE = ("d ppl: ppl minus the baseline's. KL: mean KL divergence of the model's next-token "
                   "distribution from the baseline's, in nats per predicted token (0 = identical). "
                   "top1: share of predicted tokens whose most likely next token is the baseline's.")
LEGEND_REST = ("size MB: safetensors files on disk (10^6 bytes; - for the built-in or a hub model). "
               "time s: seconds in this model's forward passes.")


def _size_on_disk(path: str | None) -> int | None:
    if path is None or not Path(path).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def dataset_list(dataset: str | Sequence[str]) -> list[str]:
    """The datasets of ``--dataset`` values: each value one name or file, or a comma list
    (a value that is an existing file is never split). Refuses a dataset given twice."""
    items = [dataset] if isinstance(dataset, str) else list(dataset)
    out = [part.strip() for item in items for part in ([item] if Path(item).is_file() else str(item).split(","))]
    out = [canonical(d) or d for d in out if d]
    if not out:
        raise UserInputError("--dataset is empty: give a dataset name (wikitext2, c4, pile-val) or a file")
    twice = next((d for i, d in enumerate(out) if d in out[:i]), None)
    if twice is not None:
        raise UserInputError(f"--dataset {twice} is given twice: give each dataset once")
    return out


def evaluate(models: list[str | None], *, dataset: str | Sequence[str] = "wikitext2", seqlen: int = 2048,
             stride: int | None = None, max_windows: int | None = None, baseline: str | None = None,
             device: str = "auto", kernel: str = "auto", data_dir: str | None = None,
             progress: Callable[..., None] = lambda *a, **k: None) -> dict[str, Any]:
    """Evaluate ``models`` (None = built-in default) on one or more datasets and return,
    per dataset, the protocol and one row per model. ``baseline`` ('default' = built-in)
    adds KL and top-1 agreement. Quantized checkpoints run packed through the ``kernel``
    dequant-matmul ('auto': Triton on CUDA, the torch reference on CPU).

    ``dataset``: a name (``wikitext2``, ``c4``, ``pile-val``; ``qtool.textsets``) or a
    file, or several (``dataset_list``), read from ``data_dir`` (default: ``textsets.data_dir``).
    The models are loaded once; each dataset is tokenized and windowed on its own with the
    same ``seqlen``, ``stride`` and ``max_windows``.

    Returns the first dataset's block at the top level (``protocol``, ``results``,
    ``dataset``, ``baseline``: the shape of a one-dataset run) and ``datasets``, one such
    block per dataset with its ``name``; ``side_by_side``: per model, every dataset's
    ``ppl``, ``delta_ppl``, ``kl_mean`` and ``top1_agreement``; ``warnings`` when some
    overlap could not be ruled out. Each row (and the baseline) also holds ``window_ppl``,
    the perplexity of every window in order, and each row ``window_kl``, the mean KL per
    predicted token of every window (None without a baseline).

    Raises:
        UserInputError: bad options, a missing dataset, different tokenizers, or a qtool
            checkpoint evaluated on documents it was calibrated on (``textsets.check_no_overlap``).
    """
    from qtool.api import load_any, resolve_device

    if seqlen < 2:
        raise UserInputError("--seqlen must be at least 2")
    if stride is not None and not 0 < stride <= seqlen:
        raise UserInputError(f"--stride must be between 1 and --seqlen ({seqlen})")
    dev = resolve_device(device)
    sources = []
    for name in dataset_list(dataset):
        progress("stage", name="dataset", detail=name)
        sources.append(resolve_eval_dataset(name, data_dir))
    if len({s.name for s in sources}) < len(sources):  # two files with the same stem
        sources = [replace(s, name=s.info["arg"]) for s in sources]
    bpath = None if baseline in (None, "default") else baseline
    records = {m: read_qtool_json(m) for m in [*models, bpath] if m is not None}  # before any model is loaded
    warnings = check_no_overlap({m: r.get("calibration") for m, r in records.items() if r is not None},
                                {s.name: s.source for s in sources})
    for warning in warnings:
        log.warning(warning)
    names = [m if m is not None else BUILTIN_NAME for m in models]
    entries = []
    for name, path in zip(names, models):
        progress("stage", name="load", detail=name)
        model, tok, info = load_any(path, kernel=kernel)
        entries.append({"name": name, "path": path, "model": model.to(dev), "tok": tok, "info": info})
    base = None
    if baseline is not None:
        progress("stage", name="load baseline", detail=baseline)
        bmodel, btok, _ = load_any(bpath)
        base = {"name": BUILTIN_NAME if bpath is None else baseline, "path": bpath, "model": bmodel.to(dev), "tok": btok}
    fingerprints = {e["name"]: _tokenizer_fingerprint(e["tok"]) for e in entries + ([base] if base else [])}
    if len(set(fingerprints.values())) > 1:
        raise UserInputError(
            f"the models use different tokenizers ({', '.join(fingerprints)}): evaluate them in separate calls"
        )
    tokenized = []  # every dataset tokenized and windowed before the first forward pass: errors come first
    for src in sources:
        progress("stage", name="tokenize", detail=f"{src.name}: {len(src.rows)} rows")
        tokenized.append(tokenize_rows(src.rows, entries[0]["tok"]))
    for e in entries + ([base] if base else []):
        check_seqlen(e["model"], seqlen)
    wins = [windows(ids.shape[1], seqlen, stride or seqlen, max_windows) for ids in tokenized]
    blocks = [_evaluate_dataset(entries, base, src, ids, w, seqlen, stride, dev, progress)
              for src, ids, w in zip(sources, tokenized, wins)]
    out = {k: v for k, v in blocks[0].items() if k != "name"}
    out["datasets"] = blocks
    out["side_by_side"] = [{"model": e["name"], "datasets": {
        b["name"]: {k: b["results"][i][k] for k in ("ppl", "delta_ppl", "kl_mean", "top1_agreement")} for b in blocks}}
        for i, e in enumerate(entries)]
    if warnings:
        out["warnings"] = warnings
    return out


def _evaluate_dataset(entries: list[dict], base: dict | None, src: EvalSource, ids, wins: list[tuple[int, int]],
                      seqlen: int, stride: int | None, dev, progress: Callable[..., None]) -> dict[str, Any]:
    """One dataset's block of ``evaluate``: ``ids`` int64 ``[1, T]`` (its rows tokenized by
    the models' tokenizer), the windows ``wins`` visited once, each model (and the
    baseline) run on every window."""
    tokenizer = entries[0]["tok"]
    acc = {e["name"]: {"nll": 0.0, "kl": 0.0, "agree": 0, "seconds": 0.0, "window_nll": [], "window_kl": []}
           for e in entries}
    base_acc = {"nll": 0.0, "seconds": 0.0, "window_nll": []}
    count, window_tokens = 0, []
    progress("eval", name=f"{src.name}: evaluating {len(entries)} model(s)" + (" and the baseline" if base else ""),
             total=len(wins), unit="window")
    for i, (start, offset) in enumerate(wins):
        base_logp = None
        if base is not None:
            t0 = time.perf_counter()
            base_logp, target = window_logprobs(base["model"], ids, start, offset, seqlen, dev)
            base_acc["window_nll"].append(-base_logp.gather(1, target[:, None]).sum().item())
            base_acc["nll"] += base_acc["window_nll"][-1]
            base_acc["seconds"] += time.perf_counter() - t0
        for e in entries:
            t0 = time.perf_counter()
            logp, target = window_logprobs(e["model"], ids, start, offset, seqlen, dev)
            a = acc[e["name"]]
            a["window_nll"].append(-logp.gather(1, target[:, None]).sum().item())
            a["nll"] += a["window_nll"][-1]
            if base_logp is not None:
                # KL(base || model) per position, summed; float64 sum for stability
                a["window_kl"].append((base_logp.exp() * (base_logp - logp)).sum(dim=-1).double().sum().item())
                a["kl"] += a["window_kl"][-1]
                a["agree"] += int((base_logp.argmax(-1) == logp.argmax(-1)).sum().item())
            a["seconds"] += time.perf_counter() - t0
            del logp
        count += target.numel()
        window_tokens.append(target.numel())
        progress("window", index=i, total=len(wins))
    proto = protocol(src.description, src.split, tokenizer, seqlen, stride, len(wins), count)
    base_ppl = math.exp(base_acc["nll"] / count) if base is not None else None
    results = []
    for e in entries:
        a = acc[e["name"]]
        ppl = math.exp(a["nll"] / count)
        results.append({
            "model": e["name"], "quantized": e["info"]["quantized"], "ppl": ppl,
            "delta_ppl": None if base_ppl is None else ppl - base_ppl,
            "kl_mean": None if base is None else max(0.0, a["kl"] / count),
            "top1_agreement": None if base is None else a["agree"] / count,
            "size_bytes": _size_on_disk(e["path"]), "seconds": round(a["seconds"], 2), "tokens": count,
            "tokens_per_s": round(count / a["seconds"], 1) if a["seconds"] else None,
            "window_ppl": _window_ppl(a["window_nll"], window_tokens),
            "window_kl": None if base is None else [max(0.0, kl / n) for kl, n in zip(a["window_kl"], window_tokens)],
        })
    out = {"name": src.name, "protocol": protocol_dict(proto), "results": results, "dataset": src.info}
    if base is not None:
        out["baseline"] = {"model": base["name"], "ppl": base_ppl, "seconds": round(base_acc["seconds"], 2),
                           "window_ppl": _window_ppl(base_acc["window_nll"], window_tokens),
                           "size_bytes": _size_on_disk(base["path"]),
                           "note": BUILTIN_NOTE if base["path"] is None else None}
    return out


def _window_ppl(window_nll: list[float], window_tokens: list[int]) -> list[float]:
    """Perplexity of each window: exp(its NLL sum / its predicted tokens)."""
    return [math.exp(nll / n) for nll, n in zip(window_nll, window_tokens)]


def _num(value: float, cell_w: int, sign: str = "") -> str:
    """``value`` right-aligned in ``cell_w`` columns: three decimals while they fit, fewer
    for large values."""
    for digits in (3, 2, 1, 0):
        text = format(value, f"{sign}.{digits}f")
        if len(text) <= cell_w:
            break
    return f"{text:>{cell_w}}"


def render_table(result: dict, width: int = 80) -> str:
    """Plain-text table: the protocol, one row for the baseline (when given) and one per
    model, and a legend of the columns under it; ``width`` columns wide. A result of
    several datasets is shown side by side (``render_side_by_side``)."""
    if len(result.get("datasets", ())) > 1:
        return render_side_by_side(result, width)
    lines = textwrap.wrap(f"protocol: {result['protocol']['description']}", width)
    base = result.get("baseline")
    rows = [{**base, "delta_ppl": 0.0, "kl_mean": 0.0, "top1_agreement": 1.0, "model": f"{base['model']} (baseline)"}
            ] if base else []
    rows += result["results"]
    if any(r["model"] == BUILTIN_NAME for r in result["results"]) or (base and base["model"] == BUILTIN_NAME):
        lines += textwrap.wrap(f"{BUILTIN_NAME} is {BUILTIN_NOTE}.", width)
    name_w = min(max(10, *(len(r["model"]) for r in rows)), width - 47)
    header = f"{'model':<{name_w}} {'ppl':>8} {'d ppl':>7} {'KL':>6} {'top1':>7} {'size MB':>7} {'time s':>6}"
    lines += ["", header, "-" * len(header)]

    def cell(value, spec: str, cell_w: int) -> str:
        return f"{'-':>{cell_w}}" if value is None else format(value, spec)

    for r in rows:
        name = r["model"] if len(r["model"]) <= name_w else "…" + r["model"][-(name_w - 1):]
        size = None if r["size_bytes"] is None else r["size_bytes"] / 1e6
        top1 = None if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.2f}%"
        d_ppl = None if r["delta_ppl"] is None else _num(r["delta_ppl"], 7, "+")
        lines.append(f"{name:<{name_w}} {_num(r['ppl'], 8)} {cell(d_ppl, '>7', 7)} "
                     f"{cell(r['kl_mean'], '6.4f', 6)} {cell(top1, '>7', 7)} {cell(size, '7.1f', 7)} {r['seconds']:>6.1f}")
    lines.append("")
    legend = " ".join((LEGEND_PPL, LEGEND_BASELINE if base else "d ppl, KL, top1: only with --baseline.", LEGEND_REST))
    lines += textwrap.wrap(legend, width)
    return "\n".join(lines)


def render_side_by_side(result: dict, width: int = 80) -> str:
    """Several datasets: each one's protocol, then one table per measure (ppl; with a
    baseline also d ppl, KL and top1), a column per dataset and a row per model (the
    baseline first in the ppl table), size and time in the ppl table, and the legend."""
    blocks = result["datasets"]
    base = blocks[0].get("baseline")
    lines = []
    for b in blocks:
        lines += textwrap.wrap(f"protocol: {b['protocol']['description']}", width, subsequent_indent="  ")
    if BUILTIN_NAME in [r["model"] for r in blocks[0]["results"]] + ([base["model"]] if base else []):
        lines += textwrap.wrap(f"{BUILTIN_NAME} is {BUILTIN_NOTE}.", width)
    col_w = max(8, *(len(b["name"]) for b in blocks))
    labels = [r["model"] for r in blocks[0]["results"]]
    all_labels = ([f"{base['model']} (baseline)"] if base else []) + labels
    name_w = max(12, min(max(len(n) for n in all_labels), width - len(blocks) * (col_w + 1) - 16))
    short = lambda n: n if len(n) <= name_w else "…" + n[-(name_w - 1):]  # noqa: E731
    cols = "".join(f" {b['name'][:col_w]:>{col_w}}" for b in blocks)
    tables = [("ppl", "ppl", lambda v: _num(v, col_w))]
    if base:
        tables += [("d ppl", "delta_ppl", lambda v: _num(v, col_w, "+")),
                   ("KL", "kl_mean", lambda v: f"{v:>{col_w}.4f}"),
                   ("top1", "top1_agreement", lambda v: f"{f'{100 * v:.2f}%':>{col_w}}")]
    for title, key, fmt in tables:
        header = f"{title:<{name_w}}{cols}" + (f" {'size MB':>7} {'time s':>7}" if key == "ppl" else "")
        lines += ["", header, "-" * len(header)]
        if key == "ppl" and base:
            lines.append(f"{short(all_labels[0]):<{name_w}}" + "".join(f" {_num(b['baseline']['ppl'], col_w)}" for b in blocks)
                         + f" {'-' if base['size_bytes'] is None else format(base['size_bytes'] / 1e6, '.1f'):>7}"
                         + f" {sum(b['baseline']['seconds'] for b in blocks):>7.1f}")
        for i, label in enumerate(labels):
            row = f"{short(label):<{name_w}}" + "".join(f" {fmt(b['results'][i][key])}" for b in blocks)
            if key == "ppl":
                size = blocks[0]["results"][i]["size_bytes"]
                row += (f" {'-' if size is None else format(size / 1e6, '.1f'):>7}"
                        f" {sum(b['results'][i]['seconds'] for b in blocks):>7.1f}")
            lines.append(row)
    lines.append("")
    legend = " ".join((LEGEND_PPL, LEGEND_BASELINE if base else "d ppl, KL, top1: only with --baseline.",
                       LEGEND_REST.rstrip(".") + ", all datasets together."))
    lines += textwrap.wrap(legend, width)
    return "\n".join(lines)
