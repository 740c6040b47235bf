"""Every `qtool` command in the README's bash blocks runs on the built-in model (issue 14,
item 3), in README order, in a fresh working directory beside a link to ../shared: the
"Usage" block, the model-card block and any other bash block, but the set-up one-liners
(the blocks with `pip install`, measured separately).

How a README line becomes a command: `export NAME=VALUE` lines set the environment of the
later commands; `MODEL` as quantize's argument is omitted (the built-in model) and
`--baseline MODEL` becomes `--baseline default`; `my.jsonl` (the user's calibration file)
is written by the test. Only speed options are appended after the documented ones (click
keeps the last value of a repeated option): quantize `--nsamples 2 --seqlen 64`, eval
`--seqlen 128 --max-windows 1`, check `--sample 2`. A command whose comment says
`needs: ...` (a model other than the built-in one, the hub) is skipped with that reason.

A quantize command that a later line repeats with `--resume` is run as the interrupted
run the README describes: in a subprocess stopped by SIGINT after two committed blocks,
which must exit 130 naming `--resume`; the `--resume` line then completes it.

Each command must exit 0 and produce what it says: checkpoints with the recorded method,
format, group size, calibration file and seed; eval's table with every model and a
perplexity; the files of --write-card, --plot and --report; inspect's summary and
verification; check's verdict; a converted checkpoint with its provenance.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, SHARED, WIKITEXT_TEST
from helpers import CliResult, run_cli

README = ROOT / "README.md"
SPEED = {
    "quantize": ["--nsamples", "2", "--seqlen", "64"],
    "eval": ["--seqlen", "128", "--max-windows", "1"],
    "check": ["--sample", "2"],
}
NEEDS = re.compile(r"\bneeds:\s*(.+)", re.IGNORECASE)


@dataclass
class Step:
    line: str  # the README line
    args: list[str] = field(default_factory=list)  # after `qtool`, placeholders resolved
    env: tuple[str, str] | None = None  # an `export NAME=VALUE` line
    needs: str | None = None  # a comment naming what the command needs


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def resolve(args: list[str]) -> list[str]:
    """README placeholders -> the built-in model: quantize's MODEL omitted, --baseline MODEL
    -> default."""
    out = []
    for i, tok in enumerate(args):
        if tok == "MODEL":
            if i and args[i - 1] == "--baseline":
                out.append("default")
                continue
            assert args[0] == "quantize" and i == 1, f"MODEL where the test has no built-in stand-in: {args}"
            continue
        out.append(tok)
    return out


def readme_steps(text: str) -> list[Step]:
    steps: list[Step] = []
    for block in bash_blocks(text):
        if "pip install" in block:
            continue  # the set-up one-liners
        comment: list[str] = []
        for raw in block.splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                comment.append(line)
                continue
            needs = NEEDS.search(" ".join(comment + ([line.split("#", 1)[1]] if "#" in line else [])))
            comment = []
            tokens = shlex.split(line, comments=True)
            if tokens[0] == "export":
                name, _, value = tokens[1].partition("=")
                steps.append(Step(line, env=(name, value)))
            elif tokens[0] == "qtool":
                steps.append(Step(line, resolve(tokens[1:]), needs=needs.group(1).strip() if needs else None))
            else:
                raise AssertionError(f"a README bash line the test does not know how to run: {line}")
    return steps


STEPS = readme_steps(README.read_text(encoding="utf-8"))


def opt(args: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` given in ``args`` (the documented one)."""
    for i, tok in enumerate(args):
        if tok in names and i + 1 < len(args):
            return args[i + 1]
    return None


def test_readme_commands_are_found():
    """The extraction sees the README's examples (not a vacuous pass over no commands)."""
    commands = {s.args[0] for s in STEPS if s.args}
    assert {"quantize", "eval", "inspect", "check", "convert"} <= commands, commands
    assert any(s.args[:2] == ["eval", "out-gptq"] for s in STEPS)
    assert not [s.line for s in STEPS if s.args and s.args[0] == "quantize" and s.args[1:2] == ["MODEL"]]


@pytest.mark.parametrize("step", [s for s in STEPS if s.needs], ids=lambda s: s.line)
def test_readme_commands_that_need_another_model(step):
    pytest.skip(f"README says it needs: {step.needs}")


def write_my_jsonl(path: Path) -> None:
    """The user's calibration file of the README (`my.jsonl`): rows with a "text" field."""
    rows = [json.loads(ln)["text"] for ln in WIKITEXT_TEST.read_text(encoding="utf-8").splitlines()[:400]]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows if r.strip()), encoding="utf-8")


def interrupted_run(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run ``qtool ARGS`` and stop it with SIGINT once two blocks are committed."""
    out = cwd / opt(args, "-o", "--output")
    second = out.parent / f"{out.name}.qtool-work" / "block-0001"
    proc = subprocess.Popen([sys.executable, "-m", "qtool", *args], cwd=cwd, stderr=subprocess.PIPE, text=True,
                            env={**env, "QTOOL_TEST_BLOCK_DELAY": "0.5"})
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not second.is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "--resume" in err, (args, proc.returncode, err[-2000:])
    assert not out.exists() and second.is_dir()


def check_quantize(args: list[str], cwd: Path) -> None:
    out = cwd / opt(args, "-o", "--output")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")), sorted(p.name for p in out.iterdir())
    rec = json.loads((out / "qtool.json").read_text())
    config = rec["config"]
    assert config["method"] == (opt(args, "--method", "-m") or "gptq")
    assert rec["format"] == config["format"] == (opt(args, "--format", "-f") or "gptq")
    if opt(args, "--group-size", "-g"):
        assert config["group_size"] == int(opt(args, "--group-size", "-g"))
    if opt(args, "--calib"):
        assert Path(opt(args, "--calib")).name in rec["calibration"]["source"], rec["calibration"]
    if opt(args, "--seed"):
        assert rec["seed"] == int(opt(args, "--seed"))
    if "--resume" in args:
        assert rec["resumed_from_block"] >= 2, rec["resumed_from_block"]
        assert not (cwd / f"{out.name}.qtool-work").exists()


def models_of(args: list[str]) -> list[str]:
    """eval's positional models (every token that is neither an option nor its value)."""
    out, i = [], 1
    while i < len(args):
        if args[i].startswith("-"):
            i += 1 if args[i] in ("--write-card", "--suite") else 2  # the flags eval's README lines use
            continue
        out.append(args[i])
        i += 1
    return out


def check_eval(args: list[str], res: CliResult, cwd: Path) -> None:
    for model in models_of(args):
        row = next((ln for ln in res.out.splitlines() if ln.split() and ln.split()[0] == model), None)
        assert row is not None, res.out
        assert re.search(r"\d+\.\d+", row.split(maxsplit=1)[1]), row  # its perplexity
        if "--write-card" in args:
            card = (cwd / model / "README.md").read_text(encoding="utf-8")
            assert "model-index" in card, card[:2000]
    if opt(args, "--baseline"):
        assert "SmolLM2-135M-Instruct" in res.out, res.out
    for flag in ("--plot", "--report"):
        if opt(args, flag):
            assert (cwd / opt(args, flag)).stat().st_size > 0
    if opt(args, "--report"):
        assert "<html" in (cwd / opt(args, "--report")).read_text(encoding="utf-8").lower()


def check_inspect(args: list[str], res: CliResult, cwd: Path) -> None:
    rec = json.loads((cwd / args[1] / "qtool.json").read_text())
    assert rec["config"]["method"] in res.out and rec["format"] in res.out, res.out
    if "--verify" in args:
        assert "all sha256 match" in res.out, res.out
    if opt(args, "--plot"):
        assert (cwd / opt(args, "--plot")).stat().st_size > 0


def check_convert(args: list[str], cwd: Path) -> None:
    out = cwd / opt(args, "-o", "--output")
    rec = json.loads((out / "qtool.json").read_text())
    assert rec["format"] == opt(args, "--to", "-t")
    assert rec["converted_from"][-1]["path"] == str((cwd / args[1]).resolve())


def run_qtool(capsys, args: list[str], cwd: Path) -> CliResult:
    """In-process, but `check` in its own process: the Triton interpreter it sets up on CPU
    must be chosen before triton is first imported, as it is when a user runs the line."""
    if args[0] != "check":
        return run_cli(capsys, *args)
    res = subprocess.run([sys.executable, "-m", "qtool", *args], check=False, cwd=cwd, capture_output=True,
                         text=True, timeout=900)
    return CliResult(res.returncode, res.stdout, res.stderr)


@pytest.mark.slow  # the built-in model: one GPTQ, one AWQ and one RTN run, three evals
def test_readme_examples_run_on_the_builtin_model(capsys, monkeypatch, tmp_path, default_model_dir):
    work = tmp_path / "work"  # the README's "repository root": ../shared lies beside it
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    write_my_jsonl(work / "my.jsonl")
    monkeypatch.chdir(work)
    runnable = [s for s in STEPS if not s.needs]
    seconds = []
    for n, step in enumerate(runnable):
        if step.env:
            monkeypatch.setenv(*step.env)
            continue
        args = [*step.args, *SPEED.get(step.args[0], [])]
        t0 = time.perf_counter()
        if any(later.args == [*step.args, "--resume"] for later in runnable[n + 1:]):
            interrupted_run(args, work, dict(os.environ))
        else:
            res = run_qtool(capsys, args, work)
            assert res.code == 0, f"README: {step.line}\nran: qtool {shlex.join(args)}\n{res.err[-3000:]}"
            kind = step.args[0]
            if kind == "quantize":
                check_quantize(args, work)
            elif kind == "eval":
                check_eval(args, res, work)
            elif kind == "inspect":
                check_inspect(args, res, work)
            elif kind == "check":  # one "ok" line per sampled layer (the last --sample given)
                sample = int(args[len(args) - 1 - args[::-1].index("--sample") + 1])
                assert len([ln for ln in res.out.splitlines() if ln.split()[:1] == ["ok"]]) == sample, res.out
            elif kind == "convert":
                check_convert(args, work)
        seconds.append(f"{time.perf_counter() - t0:6.1f}s  {step.line}")
    print("\n".join(seconds))
