"""`qtool eval` on several datasets (issue 17.1): each named set evaluates exactly its
documents (C4 500-999, pile-val 256-511, all WikiText-2 test rows) and calibrates on the
other half, a checkpoint is refused on documents it was calibrated on, and the per-dataset
perplexities of a side-by-side run equal an independent computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ROOT, SHARED
from helpers import run_cli

SETS = {"wikitext2": ("wikitext-2-raw-v1/test.jsonl", 4358), "c4": ("c4/c4-train.00000-of-01024.first1000.jsonl", 1000),
        "pile-val": ("pile-val/val-seed42-first512.jsonl", 512)}
WORDS = "river stone light garden window paper music winter bread silver".split()


def doc_text(name: str, i: int) -> str:
    return f"{name} document {i}: the {WORDS[i % 10]} and the {WORDS[i * 7 % 10]} met {i % 13} times."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder laid out like ../shared/data whose every row names its set and index."""
    root = tmp_path_factory.mktemp("data")
    for name, (rel, rows) in SETS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": doc_text(name, i)}) + "\n" for i in range(rows)), encoding="utf-8")
    return root


def test_each_set_reads_exactly_its_documents(data_dir):
    from qtool.eval import resolve_eval_dataset
    from qtool.textsets import read_documents

    expected = {"wikitext2": range(0, 4358), "c4": range(500, 1000), "pile-val": range(256, 512)}
    for name, docs in expected.items():
        src = resolve_eval_dataset(name, data_dir)
        assert src.rows == [doc_text(name, i) for i in docs], name
        assert src.info["documents"] == [docs.start, docs.stop] and src.info["file"] == str(data_dir / SETS[name][0])
    assert resolve_eval_dataset("pileval", data_dir).rows == resolve_eval_dataset("pile-val", data_dir).rows
    assert "documents 500-999 of 1000; 0-499 are for calibration" in resolve_eval_dataset("c4", data_dir).split
    assert read_documents("c4", "calib", data_dir).rows == [doc_text("c4", i) for i in range(500)]
    assert read_documents("pile-val", "calib", data_dir).rows == [doc_text("pile-val", i) for i in range(256)]


def test_the_shared_files_give_the_stated_documents():
    """The default data folder is ../shared/data and its files are the ones the protocol names."""
    from qtool.eval import resolve_eval_dataset
    from qtool.textsets import TEXT_SETS, data_dir

    assert data_dir() == SHARED / "data"
    for name, docs in (("c4", slice(500, 1000)), ("pile-val", slice(256, 512))):
        rows = [json.loads(line)["text"] for line in open(SHARED / "data" / SETS[name][0], encoding="utf-8")]
        src = resolve_eval_dataset(name)
        assert src.rows == rows[docs] and src.info["sha256"] == TEXT_SETS[name].sha256


def test_missing_data_is_one_line_naming_the_fix(tmp_path, capsys, mini_llama):
    from qtool.errors import UserInputError
    from qtool.eval import resolve_eval_dataset

    with pytest.raises(UserInputError) as info:
        resolve_eval_dataset("c4", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "c4/c4-train.00000-of-01024.first1000.jsonl" in msg
    assert "--data-dir DIR" in msg and "QTOOL_DATA=DIR" in msg
    res = run_cli(capsys, "eval", mini_llama, "--dataset", "pile-val", "--data-dir", tmp_path)
    assert res.code == 1 and "pile-val/val-seed42-first512.jsonl" in res.err and "Traceback" not in res.err


def test_dataset_lists(data_dir):
    from qtool.errors import UserInputError
    from qtool.evaluate import dataset_list

    assert dataset_list(["wikitext2,c4", "pileval"]) == ["wikitext2", "c4", "pile-val"]
    assert dataset_list("c4") == ["c4"]
    path = str(data_dir / SETS["c4"][0])
    assert dataset_list([path, "c4"]) == [path, "c4"]
    with pytest.raises(UserInputError, match="pile-val is given twice"):
        dataset_list(["pile-val", "wikitext2,pileval"])


def write_checkpoint_record(folder, calibration: dict | None):
    """A folder with only qtool.json: the overlap check reads it before any model is loaded."""
    from qtool import __version__

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qtool.json").write_text(json.dumps({"qtool_version": __version__, "calibration": calibration}))
    return folder


def test_overlap_with_calibration_is_refused(tmp_path, capsys, data_dir):
    pile = data_dir / SETS["pile-val"][0]
    whole = write_checkpoint_record(tmp_path / "whole", {"source": f"file:{pile}", "nsamples": 2, "seqlen": 64})
    res = run_cli(capsys, "eval", whole, "--suite", "--data-dir", data_dir)
    assert res.code == 1, res.err
    assert "overlaps the pile-val evaluation documents" in res.err and "--dataset wikitext2,c4 only" in res.err
    # a copy of the file elsewhere is the same file when qtool.json records its sha256
    from qtool.textfiles import sha256_file

    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(pile.read_bytes())
    moved = write_checkpoint_record(tmp_path / "moved", {"source": f"file:{copy}", "file_sha256": sha256_file(pile)})
    assert run_cli(capsys, "eval", moved, "--dataset", "pile-val", "--data-dir", data_dir).code == 1
    # the wrong half of c4 (a hand-edited record) against c4's evaluation documents
    late = write_checkpoint_record(tmp_path / "late", {"source": "dataset:c4[400:600]"})
    res = run_cli(capsys, "eval", late, "--dataset", "c4", "--data-dir", data_dir)
    assert res.code == 1 and "c4 documents 400-599" in res.err and "c4 documents 500-999" in res.err


def test_calibration_halves_never_meet_the_evaluation_halves(monkeypatch, data_dir, default_model_dir):
    from transformers import AutoTokenizer

    from qtool.calib import load_calibration
    from qtool.eval import resolve_eval_dataset
    from qtool.textsets import check_no_overlap

    monkeypatch.setenv("QTOOL_DATA", str(data_dir))
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    evaluated = {n: resolve_eval_dataset(n, data_dir).source for n in SETS}
    for name, stop in (("c4", 500), ("pileval", 256)):
        cal = load_calibration(name, tok, nsamples=8, seqlen=64, seed=0)
        record = cal.provenance()
        canonical = "pile-val" if name == "pileval" else name
        assert record["source"] == f"dataset:{canonical}[0:{stop}]" and "file_sha256" in record
        numbers = [int(w) for row in cal.input_ids for w in tok.decode(row).replace(":", " ").split() if w.isdigit()]
        assert numbers and max(n for n in numbers) < stop  # document indices (and small counts) only
        assert check_no_overlap({"ckpt": record}, evaluated) == []
    # the hub's unshuffled pile validation documents cannot be told apart: a warning
    warnings = check_no_overlap({"old": {"source": "dataset:pileval"}}, evaluated)
    assert len(warnings) == 1 and "may include" in warnings[0]


def independent_ppl(model_dir, texts: dict[str, list[str]], seqlen: int, windows: int) -> dict[str, float]:
    """Per dataset: rows joined with two newlines, tokenized once, non-overlapping windows,
    ppl = exp(mean NLL) over the first ``windows`` windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for name, rows in texts.items():
        ids = tok("\n\n".join(rows), return_tensors="pt").input_ids
        nll = 0.0
        with torch.no_grad():
            for i in range(windows):
                x = ids[:, i * seqlen:(i + 1) * seqlen]
                nll += model(x, labels=x).loss.double().item() * (seqlen - 1)
        out[name] = math.exp(nll / (windows * (seqlen - 1)))
    return out


def test_suite_side_by_side_equals_independent_runs(capsys, data_dir, mini_llama):
    from qtool.evaluate import render_table

    res = run_cli(capsys, "--json", "eval", mini_llama, "--baseline", mini_llama, "--suite", "--windows", "2",
                  "--seqlen", "32", "--data-dir", data_dir)
    assert res.code == 0, res.err
    out = res.json()
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(out, json.loads((ROOT / "schemas" / "qtool-output.schema.json").read_text()))
    assert [b["name"] for b in out["datasets"]] == ["wikitext2", "c4", "pile-val"]
    first = out["datasets"][0]
    assert all(out[k] == first[k] for k in ("protocol", "results", "dataset", "baseline"))  # one-dataset shape
    docs = {"wikitext2": range(0, 4358), "c4": range(500, 1000), "pile-val": range(256, 512)}
    theirs = independent_ppl(mini_llama, {n: [doc_text(n, i) for i in d] for n, d in docs.items()}, 32, 2)
    for block in out["datasets"]:
        name, proto, row = block["name"], block["protocol"], block["results"][0]
        assert proto["windows"] == 2 and proto["seqlen"] == 32 and proto["tokens"] == 2 * 31
        assert block["dataset"]["documents"] == [docs[name].start, docs[name].stop]
        assert abs(row["ppl"] - theirs[name]) / theirs[name] < 1e-5, (name, row["ppl"], theirs[name])
        assert row["kl_mean"] == 0.0 and row["top1_agreement"] == 1.0
        assert out["side_by_side"][0]["datasets"][name] == {k: row[k] for k in ("ppl", "delta_ppl", "kl_mean",
                                                                                  "top1_agreement")}
    assert "documents 500-999 of 1000" in out["datasets"][1]["protocol"]["description"]
    assert "documents 256-511 of 512" in out["datasets"][2]["protocol"]["description"]
    text = render_table(out, width=200)
    header = next(ln for ln in text.splitlines() if ln.startswith("ppl "))
    assert header.split()[1:4] == ["wikitext2", "c4", "pile-val"], text
    row = next(ln for ln in text.splitlines() if ln.startswith(f"{mini_llama} ") and "(baseline)" not in ln)
    assert [float(w) for w in row.split()[1:4]] == [round(b["results"][0]["ppl"], 3) for b in out["datasets"]]
    # the model card and the HTML report show one table per dataset, under its name
    from qtool.card import eval_results, results_sections

    entries = [e for b in out["datasets"] for e in eval_results(b, b["results"][0])]
    assert len({e.unique_identifier for e in entries}) == 3  # one model-index entry per dataset
    from qtool.report import render_report

    card = results_sections(out, 0)
    assert [card.index(f"**{n}**") for n in ("wikitext2", "c4", "pile-val")] == sorted(card.index(f"**{n}**") for n in
                                                                                     ("wikitext2", "c4", "pile-val"))
    assert card.count("| model | ppl |") == 3 and f"{out['datasets'][2]['results'][0]['ppl']:.3f}" in card
    page = render_report(out, [])
    assert [ln for ln in page.splitlines() if ln.startswith("<h2>")] == ["<h2>wikitext2</h2>", "<h2>c4</h2>",
                                                                         "<h2>pile-val</h2>"]
    assert page.count("<table>") == 3
