"""Orchestration behind the CLI and the Python API: validate, load, calibrate, run the
pipeline, save; evaluate; inspect. No tensor math lives here."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from qtool import __version__, distributed
from qtool.config import AWQ_METHODS, QuantizeConfig, option_defaults, resolve_awq_search_tokens
from qtool.errors import UnsupportedError, UserInputError
from qtool.io import check_output_path, load_quantized_model, read_qtool_json, sha256_file
from qtool.loading import load_model, resolve, skeleton_model, source_paths
from qtool.models import get_blocks, spec_for

log = logging.getLogger(__name__)
Progress = Callable[..., None]


def _quiet(event: str, **info: Any) -> None:
    pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserInputError(f"--device {device} is not supported: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return torch.device(device)


def check_format_options(config: QuantizeConfig, source=None) -> None:
    """Refuse, before any weights are read, method/format/option combinations that no
    model could store. The fixes the message names are checked against the layer shapes
    of ``source`` (read from its config alone, ``loading.skeleton_model``) when it is given
    and readable, else against the options only."""
    from qtool.fixes import check_plan, plan_problem, quantize_fix

    problem = plan_problem(config, None)
    if problem is None:
        return
    skeleton = None if source is None else skeleton_model(source)
    check_plan(config, None if skeleton is None else layer_shapes(skeleton, spec_for(skeleton)))
    raise problem.error(f"{problem.text}; {quantize_fix(config, None, problem)}")  # not reached: no shape helps


def layer_shapes(model, spec) -> dict[str, tuple[int, int]]:
    """``name -> (out_features, in_features)`` of every linear qtool quantizes, in order."""
    shapes = {}
    for i, block in enumerate(get_blocks(model, spec)):
        for name in spec.for_block(i).linears:
            lin = block.get_submodule(name)
            shapes[f"{spec.blocks}.{i}.{name}"] = (lin.out_features, lin.in_features)
    return shapes


def plan(model, config: QuantizeConfig, weights=None) -> tuple[Any, QuantizeConfig, dict[str, tuple[int, int]]]:
    """Architecture, resolved config and the quantized layers' shapes; every shape or
    format constraint is checked here, before calibration."""
    from qtool.fixes import check_plan
    from qtool.pipeline import check_finite

    spec = spec_for(model)
    for name, param in model.named_parameters():
        if not param.is_meta:  # a streamed block's weights are checked as they are read
            check_finite(name, param)
    shapes = layer_shapes(model, spec)
    in_features = {n: k for n, (_, k) in shapes.items()}
    # group size resolved, every option and layer shape checked; a refusal names only fixes that work here
    config = resolve_awq_search_tokens(check_plan(config, shapes), in_features)
    if spec.moe is not None:
        from qtool.models.moe import check_method

        check_method(spec, config.method)
    prove_layout(model, spec, config.method, weights)
    return spec, config, shapes


def prove_layout(model, spec, method: str, weights=None) -> None:
    """Run every block once on a few tokens: the family file must describe the real
    execution (``qtool.models.layout``) and, for AWQ (and awq-gptq), every fold must keep the float
    block's output (``qtool.awq.prove``); otherwise a one-line ``UnsupportedError``."""
    from qtool.awq.prove import prove_folds
    from qtool.models.layout import check_execution, probe_blocks

    t0, proofs = time.perf_counter(), []
    for probe in probe_blocks(model, spec, weights=weights):
        check_execution(spec, probe)
        if method in AWQ_METHODS:
            proofs += prove_folds(spec, probe)
    log.info("layout of %s checked%s in %.2fs", spec.name,
             f", {len(proofs)} AWQ folds proven (worst {max(p.rel_error for p in proofs):.1e})" if proofs else "",
             time.perf_counter() - t0)


def quantize(model: str | None, output: str | Path, config: QuantizeConfig, *, dtype: str = "auto",
             device: str = "auto", force: bool = False, resume: bool = False, restart: bool = False,
             command: str | None = None, progress: Progress = _quiet, model_free: bool | None = None,
             include: tuple[str, ...] = (), stream: bool | None = None, activations: str = "auto") -> dict:
    """Quantize MODEL (None = the built-in default) into a checkpoint folder ``output``.

    RTN on a safetensors source runs model-free (``qtool.model_free``: tensor by tensor,
    no transformers model) when that gives the same files; ``model_free`` True forces it,
    False forbids it; ``include`` (fnmatch patterns on tensor names) picks the weights to
    quantize model-free, for architectures without a qtool family file.

    Finished blocks are committed to a work folder beside the output; SIGINT/SIGTERM stop
    at the next block boundary, and after any stop (a kill included) ``resume=True``
    continues from there (byte-identical to an uninterrupted run). An existing work folder
    needs ``resume`` or ``restart`` (discard it). ``output`` (and the work folder) may not
    be, lie inside or contain the source model, even with ``force``. ``command``: the
    command line that started the run, for the model card (default: the equivalent
    ``qtool quantize`` line, ``card.equivalent_command``). Returns the
    ``qtool.json`` record.

    Under torchrun (``WORLD_SIZE`` > 1) the processes share the calibration work
    (``qtool.distributed``): rank 0 writes and returns the record; the others return
    ``{"output", "rank", "world_size"}`` once the checkpoint is written."""
    from qtool.activations import Store
    from qtool.calib import load_calibration
    from qtool.card import equivalent_command, source_facts
    from qtool.coverage import plan_coverage
    from qtool.io import layer_packer, save_from_blocks
    from qtool.methods import get_method
    from qtool.pipeline import capture_inputs, quantize_model
    from qtool.resume import WorkDir, check_work_dir, fingerprint, model_fingerprint
    from qtool.streaming import steady_allocator

    t_start = time.perf_counter()
    steady_allocator()  # a steady peak from block to block (its docstring has the numbers)
    check_activations(activations)
    if config.bits_budget:  # the layer sensitivity runs the whole float model on text
        from qtool.calib_vlm import is_image_text

        if is_image_text(config.calib):
            raise UserInputError("--bits-budget measures each layer's sensitivity on text: give it a text --calib "
                                 "(image-text rows are not supported with it yet)")
        if stream:
            raise UserInputError("--bits-budget measures each layer in the whole model, which --stream never holds: "
                                 "drop --stream")
        stream = False
    source = resolve(model)
    check_output_path(output, force, source_paths(source))
    check_work_dir(output, resume, restart, source_paths(source))
    check_format_options(config, source)
    dev, world = _join_processes(resolve_device(device), config)
    if not world.leader:  # several processes (torchrun): rank 0 reports
        progress = _quiet
    free = _model_free(source, output, config, dtype=dtype, force=force, resume=resume, restart=restart,
                       model_free=model_free,
                       include=tuple(include), model=model, command=command, device=device, progress=progress,
                       t_start=t_start)
    if isinstance(free, dict):
        return free
    mem = _memory_plan(source, config, dtype, dev, stream, False, (), activations)
    progress("stage", name="memory plan", detail=mem.line())
    progress("stage", name="load", detail=source.display)
    hf_model, tokenizer, folder, weights, streamed = _load_for_quantize(source, dtype, stream)
    progress("stage", name="weights", detail="streamed block by block" if weights.streamed else f"loaded whole ({streamed})")
    spec, config, shapes = plan(hf_model, config, weights)
    coverage = plan_coverage(hf_model, spec, config.exclude)  # refuses uncovered weights before calibration
    progress("stage", name="coverage", detail=coverage.line())
    if config.bits_budget:  # a budget no choice of widths meets is refused before the work
        from qtool.budget import check_budget

        check_budget(config, {n: shapes[n] for n in coverage.quantized}, spec)
    method = get_method(config)
    t_loaded = time.perf_counter()
    calib = None
    if method.needs_calibration or config.bits_budget:
        progress("stage", name="calibration data", detail=config.calib or "bundled calib_data")
        from qtool.calib_vlm import is_image_text, load_image_text

        # a .jsonl of {"image", "text"} rows goes through the model's processor (vision-language models)
        calib = (load_image_text(config.calib, folder, config.nsamples, config.seqlen, config.seed)
                 if is_image_text(config.calib) else
                 load_calibration(config.calib, tokenizer, config.nsamples, config.seqlen, config.seed))
    budget = None
    if config.bits_budget:  # per-layer widths from the measured sensitivity (qtool.budget)
        from qtool.budget import choose_widths

        progress("stage", name="bits budget", detail=f"{config.bits_budget} bits per weight: measuring each layer")
        config, budget = choose_widths(hf_model, spec, config, calib.input_ids, coverage.quantized, progress)
        method = get_method(config)
        progress("stage", name="bits budget", detail=budget_line(budget))
    # this process's chunks (all of them in a single process): qtool.distributed
    local_ids = None if calib is None else distributed.local_calibration(calib.input_ids, config.batch_size)
    if world.size > 1 and local_ids is not None:
        progress("stage", name="processes", detail=f"{world.size} (torchrun); rank 0 runs {len(local_ids)} of the "
                                                   f"{len(calib.input_ids)} calibration samples")
    fp = fingerprint(model_fingerprint(folder, None if folder else source.path),
                     None if calib is None else calib.sha256, {**config.to_dict(), "dtype": dtype, "device": dev.type})
    distributed.barrier()  # every process checked the output and work folders before rank 0 makes one
    # rank 0 writes the work folder; every process reads it to resume
    work = WorkDir.resume(output, fp, option_defaults()) if resume else WorkDir.start(output, fp, restart) if world.leader else None
    blocks = get_blocks(hf_model, spec)
    store = Store(mem.activations, dev, Path(output).absolute().parent)  # where the activations live
    start, done, inputs = 0 if work is None else work.next_block, {}, None
    if start:
        progress("stage", name="resume", detail=f"{start}/{len(blocks)} blocks already done in {work.path}")
        done, extras = work.load_results()
        if hasattr(method, "restore"):
            method.restore(extras)
        if calib is not None and start < len(blocks):
            from qtool.pipeline import _model_dtype

            dtype_c = torch.float32 if dev.type == "cpu" else _model_dtype(hf_model)
            captured = capture_inputs(hf_model, spec, local_ids, config.batch_size, dev, dtype_c, store)
            inputs = captured.at_block(start, store.new(distributed.local_chunks(work.load_inputs())))

    block_delay = float(os.environ.get("QTOOL_TEST_BLOCK_DELAY", "0"))  # lets tests interrupt mid-loop
    pack = layer_packer(config)

    def checkpoint_block(index, block, prefix, named, next_hidden):
        if next_hidden is not None:  # the work folder keeps every process's chunks, in order
            next_hidden = distributed.gather_chunks(next_hidden)
        if world.leader:
            extra = method.block_state(prefix) if hasattr(method, "block_state") else None
            work.save_block(index, block, prefix, named, next_hidden, pack, extra)
        if block_delay:
            time.sleep(block_delay)

    with _stop_on_signals() as stop:
        try:
            results = quantize_model(hf_model, spec, method, config, local_ids, dev,
                                     progress, start_block=start, on_block_done=checkpoint_block, inputs=inputs,
                                     should_stop=lambda: distributed.any_rank(stop()),
                                     keep_float=frozenset(shapes) - set(coverage.quantized),
                                     weights=weights, keep_qweights=False, store=store) if start < len(blocks) else {}
        finally:
            inputs = None
            store.close()  # the spill folder (--activations disk) goes, whatever happened
    results = {**done, **results}
    missing = sorted(set(coverage.quantized) - set(results))
    if missing:
        raise UnsupportedError(f"{len(missing)} planned weight(s) were not quantized, e.g. {missing[0]}; "
                               "please report this model")
    if not world.leader:  # rank 0 writes the checkpoint: wait until it is written
        distributed.barrier()
        return {"output": str(output), "rank": world.rank, "world_size": world.size}
    t_quant = time.perf_counter()
    if config.awq_save_search:
        from qtool.awq.search_io import save_search

        save_search(config.awq_save_search, method.search_results)
    progress("stage", name="save", detail=str(output))
    provenance = {
        "model": {"source": source.display, "kind": source.kind, "architecture": spec.name,
                  **source_facts(source.kind, source.path, folder)},
        "command": {"line": command, "via": "cli"} if command else
                   {"line": equivalent_command(model, output, config, dtype, device), "via": "api"},
        "calibration": None if calib is None else calib.provenance(),
        "seed": config.seed,
        **({"bits_budget": budget} if budget else {}),
        "layers": {name: {"shape": list(shapes[name]), **res.stats} for name, res in sorted(results.items())},
        "coverage": coverage.to_json(),
        "torch_version": torch.__version__,
        "device": dev.type,
        # the only run-dependent entries of qtool.json (with per-layer "seconds")
        "timings_s": {"load": round(t_loaded - t_start, 2), "quantize": round(t_quant - t_loaded, 2)},
        "resumed_from_block": start,
        "model_free": {"used": False, "reason": free},
        "streamed": {"used": weights.streamed, "reason": streamed},
        **({"distributed": {"processes": world.size}} if world.size > 1 else {}),
        # run-dependent: the memory available and the measured peak (before the save)
        "memory": {"plan": mem.to_json(), "peak_rss_bytes": _peak_rss(),
                   **({"peak_device_bytes": torch.cuda.max_memory_allocated(dev)} if dev.type == "cuda" else {})},
    }
    if hasattr(method, "finish"):
        method.finish(output)
    record = save_from_blocks(output, hf_model, spec.blocks, work, lambda names: weights.rest(hf_model, names),
                              tokenizer, folder, config, provenance, force=force)
    work.remove()
    distributed.barrier()  # the other processes return once the checkpoint is written
    record["timings_s"]["total"] = round(time.perf_counter() - t_start, 2)
    return {"output": str(output), **record}


def budget_line(budget: dict) -> str:
    """One line on a ``--bits-budget`` choice (qtool.json's ``bits_budget``)."""
    widths = ", ".join(f"{count} at {bits} bits" for bits, count in budget["widths"].items())
    return f"{widths}: {budget['bits_per_weight']} bits per weight (budget {budget['bits_budget']})"


def memory_plan(model: str | None, config: QuantizeConfig, *, dtype: str = "auto", device: str = "auto",
                stream: bool | None = None, model_free: bool | None = None, include: tuple[str, ...] = (),
                activations: str = "auto", progress: Progress = _quiet) -> dict:
    """``qtool plan``: the memory plan (``qtool.memplan``) of quantizing MODEL with
    ``config``, from its config and shard headers alone (no weight is read). Raises
    ``UserInputError`` naming options that would fit when the run would not fit."""
    check_activations(activations)
    source = resolve(model)
    check_format_options(config, source)
    dev = resolve_device(device)
    mem = _memory_plan(source, config, dtype, dev, stream, model_free, include, activations)
    return {"model": source.display, "line": mem.line(), **mem.to_json()}


def check_activations(place: str) -> None:
    from qtool.activations import PLACES

    if place not in PLACES:
        raise UserInputError(f"--activations {place}: expected one of {', '.join(PLACES)}")


def _memory_plan(source, config: QuantizeConfig, dtype: str, dev, stream: bool | None, model_free: bool | None,
                 include: tuple[str, ...], activations: str = "auto"):
    """The ``MemoryPlan`` of the path ``quantize`` would take; refuses one that does not fit."""
    from qtool import memplan, streaming
    from qtool.loading import check_dtype, local_folder

    check_dtype(dtype)
    folder = None if source.kind == "gguf" else local_folder(source)
    free = False
    if config.method == "rtn" and not config.bits_budget and model_free is not False and folder is not None:
        from qtool import model_free as mf

        try:
            mf.make_plan(Path(folder), config, dtype, tuple(include), explicit=bool(model_free or include))
            free = True
        except (mf.NotIdentical, UnsupportedError):
            free = False
    reason, target = streaming.check(folder, dtype)
    # --bits-budget's sensitivity runs the whole float model
    streamed = stream is not False and not config.bits_budget and not free and reason is None
    skeleton = skeleton_model(source)
    if skeleton is None:
        raise UserInputError(f"cannot plan {source.display}: transformers cannot build it from its config")
    spec = spec_for(skeleton)
    load_bytes = None if target is None else target.itemsize  # None: the skeleton's own dtype
    kw = dict(streamed=streamed, model_free=free, device=dev, load_bytes=load_bytes, activations=activations)
    mem = memplan.estimate(skeleton, spec, config, **kw)
    if not mem.fits:
        _refuse_unless_fits(mem, memplan.fitting_options(skeleton, spec, config, **kw))
    return mem


def _refuse_unless_fits(mem, fixes: list[str],
                        otherwise: str = "use a machine with more memory (or a GPU with --device cuda)") -> None:
    """``UserInputError`` for a plan that does not fit, naming ``fixes`` (options that fit),
    else ``otherwise``."""
    from qtool.memplan import GIB

    if mem.fits:
        return
    hint = f"try {' or '.join(fixes)}" if fixes else otherwise
    where = "CPU" if mem.peak_cpu > mem.available_cpu else "device"
    need, have = (mem.peak_cpu, mem.available_cpu) if where == "CPU" else (mem.peak_device, mem.available_device)
    raise UserInputError(f"not enough memory: this run needs about {need / GIB:.1f} GiB of {where} memory "
                         f"and {have / GIB:.1f} GiB are available ({mem.line()}); {hint}")


def _join_processes(dev: torch.device, config: QuantizeConfig):
    """``(device, world)``: under torchrun (``WORLD_SIZE`` > 1) this process joins the run's
    process group and gets its own device (``qtool.distributed``); runs with no calibration
    to share out are refused first. One process: ``(dev, World())``."""
    world = distributed.env_world()
    if world.size > 1 and (config.method == "rtn" or config.awq_load_search):
        what = "--method rtn" if config.method == "rtn" else "--load-search"
        raise UserInputError(f"{world.size} processes share out the calibration work and {what} has none: "
                             "run it as one process, without torchrun")
    if world.size > 1 and config.method == "signround":
        raise UserInputError(f"--method signround does not run under torchrun yet ({world.size} processes): its steps "
                             "are not checked against one process's; run it as one process")
    dev = distributed.init(dev)
    return dev, distributed.current()


def _load_for_quantize(source, dtype: str, stream: bool | None):
    """``(model, tokenizer, folder, weights, reason)``: a streamed skeleton
    (``qtool.streaming``) when the source allows it and ``stream`` is not False, else the
    whole model (``reason`` says why; ``stream=True`` then refuses)."""
    from qtool import streaming
    from qtool.loading import _check_weights, check_dtype, local_folder

    check_dtype(dtype)
    reason = "--no-stream" if stream is False else None
    if reason is None and source.kind == "gguf":
        reason = "the source is a GGUF file"
    if reason is None:
        folder = local_folder(source)
        _check_weights(Path(folder))
        try:
            model, weights = streaming.build_skeleton(folder, dtype)
        except streaming.NotStreamable as exc:
            reason = str(exc)
        except (ValueError, KeyError, OSError) as exc:  # load_model names the problem
            log.debug("no skeleton of %s: %s", folder, exc)
            reason = "transformers could not build the model from its config"
        else:
            from transformers import AutoTokenizer

            return model, AutoTokenizer.from_pretrained(folder), folder, weights, "streamed"
    if stream:
        raise UserInputError(f"--stream: this model cannot be streamed ({reason}); drop --stream to load it whole")
    model, tokenizer, folder = load_model(source, dtype)
    return model, tokenizer, folder, streaming.InMemory(), reason


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model_free(source, output, config: QuantizeConfig, *, dtype: str, force: bool, resume: bool, restart: bool,
                model_free: bool | None, include: tuple[str, ...], model, command, device, progress,
                t_start: float) -> dict | str:
    """Run model-free RTN when it applies (``qtool.model_free``) and return its record;
    otherwise the reason the in-model path runs (for ``qtool.json``)."""
    from qtool.loading import local_folder

    # the reason recorded depends on the run's settings, not on how it was started
    # (a flag that changed nothing, or --resume of the same run): resumed files stay identical
    why = ("--method " + config.method + " needs the model" if config.method != "rtn" else
           "--bits-budget measures each layer in the model" if config.bits_budget else
           "the source is a GGUF file" if source.kind == "gguf" else None)
    if model_free is False:
        if include:
            raise UserInputError("--include selects weights for the model-free path: drop --no-model-free or --include")
        return why or "--no-model-free"
    why = why or ("--resume/--restart: the in-model work folder" if resume or restart else None)
    if why:
        if model_free or include:
            raise UserInputError(f"--model-free/--include apply to --method rtn on a safetensors model only ({why}): "
                                 "drop them")
        return why
    from qtool import model_free as mf
    from qtool.card import equivalent_command, source_facts
    from qtool.fixes import check_plan

    folder = local_folder(source)
    try:
        free_plan = mf.make_plan(Path(folder), config, dtype, include, explicit=bool(model_free or include))
    except mf.NotIdentical as exc:
        log.info("in-model RTN: model-free would not give the same files (%s)", exc)
        return f"model-free would differ: {exc}"
    config = check_plan(config, free_plan.shapes)
    from qtool import memplan

    mem = memplan.model_free_plan(free_plan.shapes.values(), free_plan.largest_plain)
    progress("stage", name="memory plan", detail=mem.line())
    _refuse_unless_fits(mem, [], otherwise="use a machine with more memory")
    progress("stage", name="coverage", detail=free_plan.coverage["line"])
    record = {
        "model": {"source": source.display, "kind": source.kind, **source_facts(source.kind, source.path, folder)},
        "command": {"line": command, "via": "cli"} if command else
                   {"line": equivalent_command(model, output, config, dtype, device), "via": "api"},
        "calibration": None, "seed": config.seed, "torch_version": torch.__version__, "device": "cpu",
        "timings_s": {"load": round(time.perf_counter() - t_start, 2)}, "resumed_from_block": 0,
        "memory": {"plan": mem.to_json()},  # with the measured peak, added by the run
    }
    record = mf.run(Path(folder), Path(output), config, free_plan, record=record, force=force, progress=progress)
    record["timings_s"]["total"] = round(time.perf_counter() - t_start, 2)
    return {"output": str(output), **record}


class _stop_on_signals:
    """Within the block loop, SIGINT/SIGTERM ask for a stop at the next block boundary
    (after its progress is saved); a second signal interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return lambda: self.requested

    def _handle(self, signum, frame):
        import signal

        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: stopping after the current block (again to stop now)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def load_any(path: str | None, dtype: torch.dtype = torch.float32, kernel: str | None = None):
    """(model, tokenizer, info) for a float model (folder, .gguf, hub id, default) or a
    quantized checkpoint (read through its format). With ``kernel`` ('auto', 'triton',
    'torch') a checkpoint's linears stay packed and run through that dequant-matmul
    kernel; without, they hold their dequantized float weights."""
    from transformers import AutoTokenizer

    from qtool.io import load_packed_model

    if path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file():
        cfg = json.loads((Path(path) / "config.json").read_text())
        if cfg.get("quantization_config"):
            model = load_quantized_model(path, dtype) if kernel is None else load_packed_model(path, dtype, kernel)
            tokenizer = AutoTokenizer.from_pretrained(path)
            return model, tokenizer, {"path": str(path), "quantized": True}
    source = resolve(path)
    model, tokenizer, folder = load_model(source, "float32" if dtype == torch.float32 else str(dtype).split(".")[-1])
    return model, tokenizer, {"path": source.display, "quantized": False}


def inspect_checkpoint(path: str | Path, verify: bool = False) -> dict:
    """What a checkpoint holds: method, bits, group size, format, a ``summary``
    (``qtool.summary.checkpoint_summary``), per-layer stats in natural layer order,
    calibration provenance; with ``verify`` the sha256 of every file is recomputed."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} is not a checkpoint folder (no config.json)")
    record = read_qtool_json(path)
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config")
    out: dict[str, Any] = {"path": str(path), "quantization_config": qcfg}
    if record is None:
        out["qtool"] = None
        return out
    from qtool.summary import checkpoint_summary, natural_key

    cfg, layers = record["config"], record.get("layers", {})
    out.update({
        "qtool_version": record["qtool_version"], "method": cfg["method"], "bits": cfg["bits"],
        "group_size": cfg["group_size"], "sym": cfg["sym"], "format": record["format"],
        "calibration": record.get("calibration"), "model": record.get("model"),
        "layers": {name: layers[name] for name in sorted(layers, key=natural_key)},
        "timings_s": record.get("timings_s"), "summary": checkpoint_summary(path, record),
        "bits_budget": record.get("bits_budget"), "layer_bits": dict(cfg.get("layer_bits") or ()),
    })
    if verify:
        mismatched = [name for name, digest in record["files_sha256"].items()
                      if not (path / name).is_file() or sha256_file(path / name) != digest]
        out["verified"] = not mismatched
        out["mismatched_files"] = mismatched
    return out


__all__ = ["quantize", "inspect_checkpoint", "load_any", "plan", "resolve_device", "__version__"]


def check_checkpoint(path: str | Path, *, sample: int | None = None, kernel: str = "auto", seed: int = 0,
                     progress: Progress = _quiet) -> dict:
    """Run quantized layers of a checkpoint through the dequant-matmul kernel and the torch
    reference on random inputs; report the worst relative error per layer.

    GPTQ and Marlin checkpoints run in their own layout; AWQ and compressed-tensors layers
    are repacked to the GPTQ layout first (as serving engines do at load time)."""
    from qtool.io import kernel_layers, read_quantized_layers
    from qtool.kernels.check import check_layers, sample_names

    qweights, _, fmt_name, _ = read_quantized_layers(path)
    total = len(qweights)
    chosen = sample_names(list(qweights), sample, seed)  # repack only the layers checked
    kernel_fmt, packed = kernel_layers({name: qweights[name] for name in chosen}, fmt_name)
    layers = {name: (kernel_fmt, tensors, meta) for name, (tensors, meta) in packed.items()}
    count = len(layers)
    progress("eval", name="check", total=count, unit="layer")
    done = []

    def step(name: str) -> None:
        progress("window", index=len(done), total=count)
        done.append(name)

    t0 = time.perf_counter()
    results = check_layers(layers, kernel=kernel, seed=seed, progress=step)
    rows = [{"layer": r.name, "format": r.format, "worst_rel_error": r.worst_rel_error, "ok": r.ok, "error": r.error}
            for r in results]
    return {"path": str(path), "format": fmt_name, "kernel_layout": kernel_fmt, "kernel": kernel,
            "layers_total": total, "layers_checked": len(rows), "ok": all(r["ok"] for r in rows),
            "seconds": round(time.perf_counter() - t0, 2), "layers": rows}
