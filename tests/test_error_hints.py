"""Every option or command an error suggests is one the CLI accepts, for the command the
error comes from, and the fixes a refusal names work for the model at hand.

The suggestions are collected from the error paths themselves (a sweep of quantize option
sets through the plan check, ``qtool convert`` to every format, and option errors through
the CLI), every ``--option`` / ``-o`` fragment and every backticked ``qtool <command> ...``
is parsed with the real click command (typer's ``get_command``), and each quantize fix,
applied to the refused command line, is checked against the model's real layer shapes.

Models: a mini Llama with hidden size 192 (k % 128 != 0 like SmolLM2's 576: no Marlin
checkpoint is possible) and the suite's mini Llama with hidden size 128 (Marlin works)."""

from __future__ import annotations

import ast
import functools
import itertools
import re
from pathlib import Path

import pytest
from conftest import make_mini_model
from helpers import run_cli

from qtool.config import QuantizeConfig
from qtool.errors import QtoolError

SWITCH_WORDS = {"true", "false", "yes", "no", "on", "off"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")  # PATH, FILE, DIR, MODEL, N
# words after an option that make it a mention in a sentence ("--gptq-version only applies ..."), not a value
PROSE = {"is", "only", "applies", "must", "does", "and", "or", "to", "for", "was", "with", "takes", "needs", "setting"}
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*(?:/--?[a-zA-Z][\w-]*)*)")
QTOOL_COMMAND = re.compile(r"`qtool ([a-z]+)([^`]*)`")
# what a command needs before a fragment can be parsed on its own (the fragment comes last: it wins)
STUBS = {"quantize": ["-o", "OUT"], "convert": ["CKPT", "--to", "gptq", "-o", "OUT"], "eval": [], "inspect": ["CKPT"],
         "check": ["CKPT"]}


@functools.cache
def _commands() -> dict:
    """The real CLI's click commands by name (typer's ``get_command``)."""
    from typer.main import get_command

    from qtool.cli import app

    return get_command(app).commands


@pytest.fixture(scope="module")
def cli_commands():
    return _commands()


def _param(command, flag: str):
    for p in command.params:
        if flag in getattr(p, "opts", []) + getattr(p, "secondary_opts", []):
            return p
    return None


def _parse(commands, name: str, args: list[str], message: str) -> None:
    """Parse ``args`` with command ``name`` as the CLI would; fail the test on any usage error."""
    command = commands[name]
    try:
        command.make_context(name, [*STUBS[name], *args])
    except Exception as exc:  # click's UsageError family: the suggestion is not valid CLI
        pytest.fail(f"`qtool {name} {' '.join(args)}` from this error is not accepted ({exc}):\n{message}")


def suggestions(message: str, command: str, commands) -> list[tuple[str, list[str]]]:
    """``(command, args)`` of every suggestion in ``message``: backticked ``qtool X ...``
    commands, and each ``--option [value]`` outside backticks (attributed to ``command``)."""
    found = [(m.group(1), m.group(2).split()) for m in QTOOL_COMMAND.finditer(message)]
    prose = re.sub(r"`[^`]*`", "", message)  # other programs' commands (`hf download ...`) are not ours
    for m in FLAG.finditer(prose):
        rest = prose[m.end():].split()
        for flag in m.group(1).split("/"):
            param = _param(commands[command], flag)
            if param is None:
                found.append((command, [flag]))  # unknown: parsing it reports the error
                continue
            value = rest[0].rstrip(",;:)") if rest else ""
            if getattr(param, "is_flag", False):
                assert value.lower() not in SWITCH_WORDS, f"{flag} is a switch but the message gives it '{value}': {message}"
                found.append((command, [flag]))
            elif value and not PLACEHOLDER.match(value) and value not in PROSE:
                found.append((command, [flag, value]))
            # else: an option with a placeholder value ("--calib PATH"): the option exists, nothing to parse
    return found


def check_all(message: str, command: str, commands) -> list[tuple[str, list[str]]]:
    """Parse every suggestion of ``message`` (an error of ``qtool command``); return them."""
    found = suggestions(message, command, commands)
    for name, args in found:
        _parse(commands, name, args, message)
    return found


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory, default_model_dir) -> Path:
    """hidden 192, intermediate 384: every k is a multiple of 64 but q/k/v/o/gate/up are not of 128."""
    root = tmp_path_factory.mktemp("odd192")
    return make_mini_model(root / "model", "llama", default_model_dir, hidden_size=192, intermediate_size=384,
                           num_attention_heads=3, num_key_value_heads=1)


def _shapes(folder: Path) -> dict[str, tuple[int, int]]:
    from qtool.api import layer_shapes
    from qtool.loading import resolve, skeleton_model
    from qtool.models import spec_for

    skeleton = skeleton_model(resolve(str(folder)))
    return layer_shapes(skeleton, spec_for(skeleton))


def _config_from_cli(args: list[str]) -> QuantizeConfig:
    """The ``QuantizeConfig`` fields that the real ``qtool quantize`` parser gives ``args``."""
    return QuantizeConfig(**_quantize_kwargs(args))


SWEEP = [dict(method=m, format=f, bits=b, group_size=g, sym=s, act_order=a)
         for m, f, b, g, s, a in itertools.product(["rtn", "gptq", "awq"], ["gptq", "awq", "marlin", "compressed-tensors"],
                                                   [4, 8], [0, -1, 64, 128], [None, True, False], [True, False])
         if not (m != "gptq" and not a)]


def _cli_args(opts: dict) -> list[str]:
    args = ["--method", opts["method"], "--format", opts["format"], "--bits", str(opts["bits"]),
            "--group-size", str(opts["group_size"]), "--act-order" if opts["act_order"] else "--no-act-order"]
    return args + ([] if opts["sym"] is None else ["--sym" if opts["sym"] else "--asym"])


@pytest.mark.parametrize("model", ["odd", "mini"])
def test_quantize_refusals_suggest_fixes_that_work(cli_commands, odd_model, mini_llama, model):
    """Every refusal of the plan check names only option sets that the CLI accepts and that
    pass the same check on this model; when it names none for the format, no option set works."""
    from qtool.fixes import check_plan, plan_problem

    folder = odd_model if model == "odd" else mini_llama
    shapes = _shapes(folder)
    refused = 0
    for opts in SWEEP[:: 5 if model == "mini" else 2]:
        config = QuantizeConfig(**opts)
        try:
            check_plan(config, shapes)
            continue
        except QtoolError as exc:
            message = str(exc)
        refused += 1
        base = _cli_args(opts)
        check_all(message, "quantize", cli_commands)
        fixes = re.findall(r"(?:what works for this model: |formats that work: |\(or )([^;()]*)", message)
        options = [opt.strip() for part in fixes for opt in part.split(",") if opt.strip()]
        if "no setting of --group-size" in message:  # the message says nothing works with this format: verify
            assert not any(plan_problem(QuantizeConfig(**{**opts, **extra}), shapes) is None
                           for extra in _all_settings(opts)), message
        assert options or "no format qtool writes works either" in message, message
        for fix in options:
            fixed = _config_from_cli([str(folder), *base, *fix.split()])
            assert plan_problem(fixed, shapes) is None, f"suggested '{fix}' does not work:\n{message}"
    assert refused > 5


def _all_settings(opts: dict):
    for g, s, b in itertools.product([0, -1, 32, 64, 128], [True, False], [4, 8]):
        for a, static in ([(True, False), (True, True), (False, False)] if opts["method"] == "gptq" else [(True, False)]):
            yield {"group_size": g, "sym": s, "bits": b, "act_order": a, "static_groups": static}


def test_marlin_on_a_model_without_k_multiple_of_128(capsys, cli_commands, odd_model, tmp_path):
    """The dead end of the built-in model (k = 576): every Marlin attempt is refused with a
    message that says no setting works and why, and suggests only formats that work; the
    first suggestion really quantizes."""
    lines = []
    for extra in ([], ["-g", "128"], ["-g", "-1"], ["-g", "64", "--asym"]):
        res = run_cli(capsys, "-q", "quantize", odd_model, "--method", "rtn", "--format", "marlin", *extra,
                      "-o", tmp_path / "out")
        assert res.code == 1, res.err
        line = res.err.strip().splitlines()[-1]
        assert "no setting of --group-size, --bits, --sym/--asym or act-order makes --format marlin work" in line, line
        assert "Marlin kernel limit" in line, line
        assert "use --group-size 128" not in line and not (tmp_path / "out").exists()
        check_all(line, "quantize", cli_commands)
        lines.append(line)
    fix = re.search(r"formats that work: ([^,]*)", lines[0]).group(1).split()
    res = run_cli(capsys, "-q", "quantize", odd_model, "--method", "rtn", "--format", "marlin", *fix,
                  "-o", tmp_path / "ok")
    assert res.code == 0, res.err


def test_marlin_on_a_compatible_model(capsys, cli_commands, mini_llama, tmp_path):
    """With k % 128 == 0 the automatic group size (128) is a valid Marlin checkpoint: not
    refused before loading on a guessed group size; a refused group size points to ones that work."""
    res = run_cli(capsys, "-q", "--json", "quantize", mini_llama, "--method", "rtn", "--format", "marlin",
                  "-o", tmp_path / "auto")
    assert res.code == 0, res.err
    assert res.json()["config"]["group_size"] == 128
    res = run_cli(capsys, "-q", "quantize", mini_llama, "--method", "rtn", "--format", "marlin", "-g", "64",
                  "-o", tmp_path / "g64")
    line = res.err.strip().splitlines()[-1]
    assert res.code == 1 and "what works for this model: " in line, line
    fixes = [f.strip() for f in re.search(r"what works for this model: ([^(;]*)", line).group(1).split(",")]
    assert "--group-size 128" in fixes and "--asym" in fixes, line
    check_all(line, "quantize", cli_commands)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, odd_model, mini_llama) -> dict[str, Path]:
    from qtool.api import quantize

    root = tmp_path_factory.mktemp("hint-ckpts")
    made = {}
    for name, folder, opts in [("odd-sym-g64", odd_model, dict(method="rtn", group_size=64, sym=True)),
                               ("mini-sym-g64", mini_llama, dict(method="rtn", group_size=64, sym=True))]:
        quantize(str(folder), root / name, QuantizeConfig(**opts), device="cpu")
        made[name] = root / name
    return made


@pytest.mark.parametrize("name", ["odd-sym-g64", "mini-sym-g64"])
def test_convert_refusals_suggest_convert_options_that_work(capsys, cli_commands, checkpoints, odd_model, mini_llama,
                                                            tmp_path, name):
    """A refused conversion names ``--to`` targets that convert (each is run) and, as a
    ``qtool quantize`` command, a re-quantization that fits this model, or says none can."""
    from qtool.fixes import plan_problem

    ckpt = checkpoints[name]
    shapes = _shapes(odd_model if name.startswith("odd") else mini_llama)
    converted, refused = set(), {}
    for target in ("gptq", "awq", "marlin", "compressed-tensors"):
        res = run_cli(capsys, "-q", "convert", ckpt, "--to", target, "-o", tmp_path / target)
        if res.code == 0:
            converted.add(target)
        else:
            refused[target] = res.err.strip().splitlines()[-1]
    assert refused
    for target, line in refused.items():
        for command, args in check_all(line, "convert", cli_commands):
            if command == "convert" and args[0] == "--to":
                assert args[1] in converted, f"suggested --to {args[1]} does not convert:\n{line}"
            elif command == "quantize":
                config = QuantizeConfig(**_quantize_kwargs(args))
                assert plan_problem(config, shapes) is None, f"suggested quantize {args} does not fit:\n{line}"
        if name.startswith("odd") and target == "marlin":
            assert "no quantization of this model can be stored as marlin" in line and "Marlin kernel limit" in line, line
        if name == "mini-sym-g64" and target == "marlin":
            assert "`qtool quantize MODEL " in line, line


def _quantize_kwargs(args: list[str]) -> dict:
    """The QuantizeConfig fields of a suggested ``qtool quantize MODEL ...`` command (which
    spells every option out)."""
    ctx = _commands()["quantize"].make_context("quantize", [*args, "-o", "OUT"])
    p = ctx.params
    return dict(method=p["method"], format=p["fmt"], bits=p["bits"], group_size=p["group_size"], sym=p["sym"],
                act_order=p["act_order"], static_groups=p.get("static_groups"))


@pytest.mark.parametrize("command,args", [
    ("quantize", ["--bits", "3"]),
    ("quantize", ["--group-size", "48"]),
    ("quantize", ["--method", "rtn", "--static-groups"]),
    ("quantize", ["--method", "rtn", "--format", "awq"]),
    ("quantize", ["--format", "awq", "--bits", "8"]),
    ("quantize", ["--damp", "0"]),
    ("quantize", ["--device", "tpu"]),
    ("quantize", ["--sym", "false"]),
    ("convert", ["--to", "awq", "--gptq-version", "2"]),
    ("convert", ["--to", "awq"]),
    ("convert", ["--to", "marlin"]),
    ("eval", ["--seqlen", "4096"]),
])
def test_cli_error_suggestions_parse(capsys, cli_commands, checkpoints, mini_llama, tmp_path, command, args):
    target = checkpoints["mini-sym-g64"] if command == "convert" else mini_llama
    if command == "eval":
        text = tmp_path / "text.txt"
        text.write_text("a few words of text to evaluate on. " * 50)
        args = [*args, "--dataset", str(text)]
    out = ["-o", tmp_path / "out"] if command in ("quantize", "convert") else []
    res = run_cli(capsys, "-q", command, *([] if args[:2] == ["--sym", "false"] else [target]), *args, *out)
    assert res.code in (1, 2), res.err
    message = res.err.strip().splitlines()[-1]
    check_all(message, command, cli_commands)


def _message_strings(tree: ast.AST) -> list[str]:
    """Every string literal of a module except docstrings (f-strings included, piece by piece)."""
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.add(id(body[0].value))
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_source_has_no_switch_given_a_value():
    """No message anywhere in the source gives an on/off switch a value (``--sym false``):
    the switches take none."""
    commands = _commands()
    switches = {opt for cmd in commands.values() for p in cmd.params if getattr(p, "is_flag", False)
                for opt in p.opts + p.secondary_opts}
    src = Path(__file__).resolve().parents[1] / "src" / "qtool"
    bad = []
    for path in sorted(src.rglob("*.py")):
        for text in _message_strings(ast.parse(path.read_text())):
            for m in re.finditer(r"(?<![\w-])(--[a-z][\w-]*) (true|false|yes|no|on|off)\b", text, re.IGNORECASE):
                if m.group(1) in switches:
                    bad.append(f"{path.name}: {m.group(0)!r} in {text!r}")
    assert not bad, bad
