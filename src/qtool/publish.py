"""Orchestration of what ``qtool eval`` and ``qtool inspect`` write for people beside their
tables: the results in each checkpoint's model card (``--write-card``), the figures
(``--plot``) and the self-contained HTML report (``--report``). The options are checked
by ``check_*`` before any model is loaded; the ``write_*`` functions run after."""

from __future__ import annotations

import logging
from pathlib import Path

from qtool.errors import UserInputError

log = logging.getLogger(__name__)
REPORT_SUFFIXES = (".html", ".htm")


def qtool_checkpoint(path: str | None) -> bool:
    """Whether ``path`` is a checkpoint folder written by qtool (it has ``qtool.json``)."""
    from qtool.io import QTOOL_JSON

    return path is not None and (Path(path) / QTOOL_JSON).is_file()


def check_eval_outputs(models: list[str | None], *, write_card: bool = False, plot: str | None = None,
                       report: str | None = None) -> None:
    """Refuse, before the evaluation, a plot or report file name qtool cannot write and
    ``--write-card`` when no model is a qtool checkpoint."""
    from qtool.plots import check_plot_path

    if plot is not None:
        check_plot_path(plot, "--plot")
    if report is not None:
        check_plot_path(report, "--report", REPORT_SUFFIXES)
    if write_card and not any(qtool_checkpoint(m) for m in models):
        raise UserInputError("--write-card writes the results into the model card of qtool checkpoints, and none of "
                             "the models is one (a folder with qtool.json): evaluate a checkpoint or drop --write-card")


def write_eval_outputs(result: dict, models: list[str | None], *, write_card: bool = False, plot: str | None = None,
                       report: str | None = None) -> list[str]:
    """Write what ``check_eval_outputs`` accepted for the ``qtool eval`` ``result`` of
    ``models`` (in the order of ``result["results"]``); return the paths written.

    ``write_card``: the results section of every qtool checkpoint's card (other models
    are left alone, with a warning); ``plot``: ``plots.eval_figure``; ``report``: the
    HTML page with the table, that figure and each checkpoint's per-layer error figure."""
    from qtool.card import write_eval_results
    from qtool.io import read_qtool_json
    from qtool.plots import eval_figure, figure_bytes, has_layer_errors, layer_error_figure, save_figure
    from qtool.report import write_report

    written = []
    if write_card:
        for index, (path, row) in enumerate(zip(models, result["results"])):
            if qtool_checkpoint(path):
                written.append(str(write_eval_results(path, read_qtool_json(path), result, index)))
            else:
                log.warning("--write-card: %s is not a qtool checkpoint; no card written for it", row["model"])
    if plot is not None:
        written.append(str(save_figure(eval_figure(result), plot)))
    if report is not None:
        figures = [("Perplexity per window" + (" and KL divergence from the baseline" if result.get("baseline") else ""),
                    figure_bytes(eval_figure(result)))]
        for path, row in zip(models, result["results"]):
            record = read_qtool_json(path) if qtool_checkpoint(path) else None
            if record is not None and has_layer_errors(record):
                figures.append((f"{row['model']}: relative error per layer (qtool.json)",
                                figure_bytes(layer_error_figure(record))))
        written.append(str(write_report(report, result, figures)))
    return written


def write_layer_plot(checkpoint: str | Path, plot: str | Path) -> str:
    """``qtool inspect --plot``: the per-layer error figure of a qtool checkpoint."""
    from qtool.io import read_qtool_json
    from qtool.plots import layer_error_figure, save_figure

    record = read_qtool_json(checkpoint)
    if record is None:
        raise UserInputError(f"--plot draws the per-layer errors that qtool records in qtool.json, and {checkpoint} "
                             "has none (not written by qtool): drop --plot")
    return str(save_figure(layer_error_figure(record), plot))
