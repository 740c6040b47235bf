"""The memory plan: the peak CPU (and device) memory a ``qtool quantize`` run will need,
estimated before anything is loaded, from the model's config and the options alone.

What the run holds at its peak (every term is in ``MemoryPlan.parts``):

- ``runtime``: the Python process with torch, transformers and the tokenizer
  (``RUNTIME_BYTES``, measured: a run that refuses right after planning).
- ``resident weights``: loaded whole, every parameter in the load dtype; streamed, the
  tensors outside the blocks that stay loaded (the embeddings).
- ``block``: one block in float32 for the computation, plus (streamed) its tensors as
  read, in the load dtype.
- ``activations``: the calibration hidden states of the current block's input and
  output, float32 ``[tokens, hidden]`` each (none for RTN); GPTQ also keeps the
  attention's and the MLP's outputs of every chunk for its true-sequential stages and
  the next block's inputs (5 such copies); SignRound the float block's outputs, its
  targets (3 copies).
- ``forward``: the intermediate tensors of one calibration chunk through a block (MLP
  activations, attention scores of every head, which CPU attention materialises).
- ``method``: GPTQ's Hessians of the block's linears (float32 ``k x k`` each) and the
  solver's copies of the largest layer; AWQ's search subsample of every scale group's
  input and the outputs it compares; SignRound's per-weight parameters with their
  gradients and best copy, and the intermediates autograd keeps for one chunk's backward.
- ``sensitivity`` (``--bits-budget``): the float model's log-probabilities of the
  sensitivity samples, float32 ``[tokens, vocab]``, one forward's logits, and every
  block's float input hidden states of those samples.
- ``save buffers``: copying the shards and reading them back, 64 MB chunks.
- ``unaccounted``: ``SLACK`` of the sum of the terms above (allocator fragmentation,
  temporaries); measured on the default model and the synthetic models of
  ``benchmarks/memory_scaling.py``, where the estimate is within 25% of the peak RSS.

The device (``--device cuda``) holds ``block`` + ``forward`` + ``method``; the CPU then
holds the rest.

Where the activations live (``--activations``, ``qtool.activations``): ``auto`` puts
them on the device when the device's plan fits with them, else in CPU memory when the
CPU's plan fits with them, else on disk, where they take one chunk's memory (two chunks'
worth of each copy in flight) and ``spill_bytes`` of disk.

Model-free RTN (``qtool.model_free``) holds one tensor at a time: runtime plus the
largest weight in float32 and its codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

RUNTIME_BYTES = 560 << 20
COPY_CHUNK = 64 << 20  # qtool.tensorfiles.COPY_CHUNK
SLACK = 0.10
GIB = 1 << 30


@dataclass
class MemoryPlan:
    """Estimated peak memory of a run and what is available, in bytes."""

    peak_cpu: int
    available_cpu: int
    peak_device: int | None = None
    available_device: int | None = None
    streamed: bool = False
    model_free: bool = False
    parts: dict[str, int] = field(default_factory=dict)
    activations: str = "cpu"  # where the calibration activations live: device | cpu | disk
    spill_bytes: int = 0  # disk the activations take when they are spilled

    @property
    def fits(self) -> bool:
        cpu = self.peak_cpu <= self.available_cpu
        dev = self.peak_device is None or self.available_device is None or self.peak_device <= self.available_device
        return cpu and dev

    def line(self) -> str:
        how = "model-free" if self.model_free else "streamed" if self.streamed else "loaded whole"
        text = f"peak ~{self.peak_cpu / GIB:.2f} GiB CPU of {self.available_cpu / GIB:.1f} GiB available ({how})"
        if self.peak_device is not None:
            text += f", ~{self.peak_device / GIB:.2f} GiB on the device"
            if self.available_device is not None:
                text += f" of {self.available_device / GIB:.1f} GiB"
        if self.activations == "disk":
            text += f"; activations spilled to disk ({self.spill_bytes / GIB:.2f} GiB)"
        return text

    def to_json(self) -> dict:
        return {"peak_cpu_bytes": self.peak_cpu, "available_cpu_bytes": self.available_cpu,
                "peak_device_bytes": self.peak_device, "available_device_bytes": self.available_device,
                "streamed": self.streamed, "model_free": self.model_free, "fits": self.fits,
                "parts_bytes": dict(self.parts), "activations": self.activations,
                "spill_bytes": self.spill_bytes}


def available_cpu() -> int:
    """Memory the run may use: what the OS says is available now (``MemAvailable``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def available_device(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def _nbytes(params, dtype_bytes: int | None) -> int:
    return sum(p.numel() * (dtype_bytes or p.element_size()) for p in params)


def estimate(model, spec, config, *, streamed: bool, model_free: bool = False, device: torch.device | None = None,
             load_bytes: int | None = None, activations: str = "auto") -> MemoryPlan:
    """The plan of quantizing ``model`` (parameters may be on the meta device) with
    ``config``. ``load_bytes``: bytes per float of the load dtype (None: the model's);
    ``activations``: where they live (``auto``: chosen here, see the module's text)."""
    from qtool.models import get_blocks

    device = device or torch.device("cpu")
    blocks = get_blocks(model, spec)
    block_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    elt = load_bytes or next(p.element_size() for p in model.parameters() if p.is_floating_point())
    mcfg = getattr(model.config, "get_text_config", lambda: model.config)()
    hidden = mcfg.hidden_size
    # the largest block's linears (blocks may differ: DeepSeek's dense first blocks, ArchSpec.for_block)
    big = max(range(len(blocks)), key=lambda i: sum(p.numel() for p in blocks[i].parameters()), default=None)
    linears = [] if big is None else [(lin.out_features, lin.in_features) for lin in
                                      (blocks[big].get_submodule(n) for n in spec.for_block(big).linears)]
    embed = model.get_input_embeddings().weight.numel()
    if model_free:
        return model_free_plan(linears, embed * (elt + 1))
    parts: dict[str, int] = {"runtime": RUNTIME_BYTES}
    all_params = sum(p.numel() for p in model.parameters())
    if streamed:
        parts["resident weights"] = embed * elt
        parts["block"] = block_params * (4 + elt)
    else:
        parts["resident weights"] = all_params * elt
        parts["block"] = block_params * 4
    calibrated = config.method != "rtn"
    tokens = config.nsamples * config.seqlen if calibrated else 0
    chunk = min(config.batch_size, max(config.nsamples, 1)) * config.seqlen if calibrated else 0
    # GPTQ also replays the attention and MLP outputs of every chunk (true-sequential stages)
    copies = 5 if config.method in ("gptq", "awq-gptq") else 3 if config.method == "signround" else 2
    all_chunks = copies * tokens * hidden * 4
    parts["activations"] = all_chunks
    inter = max((n for n, _ in linears), default=hidden)
    heads = getattr(mcfg, "num_attention_heads", 1) or 1
    batch = min(config.batch_size, max(config.nsamples, 1)) if calibrated else 0
    parts["forward"] = chunk * (3 * inter + 8 * hidden) * 4 + 2 * batch * heads * config.seqlen ** 2 * 4
    if config.method in ("gptq", "awq-gptq"):
        hess = sum(k * k * 4 for _, k in linears)
        n, k = max(linears, key=lambda s: s[0] * s[1], default=(0, 0))
        parts["method"] = hess + 4 * n * k * 4 + 3 * k * k * 4
    if config.method == "signround":  # its rounding offsets, their gradients, the best ones and the float and
        # fake-quantized weights (float32, one block), and the chunk intermediates autograd keeps for the backward
        # (about one forward's: measured on the built-in model, plan 2.07 GiB for a 1.67 GiB peak, 1.24)
        parts["method"] = 6 * block_params * 4 + parts["forward"]
    if config.method in ("awq", "awq-gptq"):
        search = min(tokens, getattr(config, "awq_search_tokens", None) or 4096) if tokens else 0
        widest = sum(n for n, _ in linears)
        parts["method"] = parts.get("method", 0) + search * (hidden + 2 * widest) * 4 * 2
    if getattr(config, "bits_budget", 0):  # the sensitivity pass (qtool.budget): the float model's
        from qtool.budget import SENSITIVITY_SAMPLES  # log-probabilities, kept, plus one forward's

        vocab = getattr(mcfg, "vocab_size", 0) or 0
        parts["sensitivity"] = ((SENSITIVITY_SAMPLES + 3) * vocab  # and every block's float input
                                + SENSITIVITY_SAMPLES * len(blocks) * hidden) * config.seqlen * 4
    parts["save buffers"] = 3 * COPY_CHUNK  # the shards are copied and read back in chunks
    cpu_avail = available_cpu()
    dev_avail = available_device(device)

    def cpu_parts(act: int) -> dict[str, int]:
        out = {**parts, "activations": act}
        out["unaccounted"] = int(sum(v for key, v in out.items() if key != "runtime") * SLACK)
        return out

    def dev_peak(act: int) -> int:
        return int((sum(parts.get(p, 0) for p in ("block", "forward", "method")) + act) * (1 + SLACK))

    on_disk = 2 * copies * chunk * hidden * 4  # the chunks being read and written
    place = activations
    if place == "auto":
        if not calibrated:
            place = "cpu"
        elif device.type == "cuda" and (dev_avail is None or dev_peak(all_chunks) <= dev_avail):
            place = "device"
        elif sum(cpu_parts(all_chunks).values()) <= cpu_avail:
            place = "cpu"
        else:
            place = "disk"
    if place == "device" and device.type != "cuda":
        place = "cpu"  # a CPU run's device memory is CPU memory
    final = cpu_parts({"device": 0, "cpu": all_chunks, "disk": on_disk}[place] if calibrated else 0)
    peak_dev = None
    if device.type == "cuda":
        peak_dev = dev_peak(all_chunks if place == "device" else on_disk if place == "disk" else 0)
    return MemoryPlan(int(sum(final.values())), cpu_avail, peak_dev, dev_avail, streamed, False, final,
                      activations=place, spill_bytes=all_chunks if place == "disk" else 0)


def model_free_plan(shapes, largest_plain: int = 0) -> MemoryPlan:
    """Model-free RTN's plan from the ``(n, k)`` shapes of the weights it quantizes: the
    runtime and the largest weight in float32 with its codes, or the largest tensor kept
    in float (the embeddings) as read with its finiteness check, whichever is larger
    (``largest_plain`` bytes)."""
    n, k = max(shapes, key=lambda s: s[0] * s[1], default=(0, 0))
    parts = {"runtime": RUNTIME_BYTES, "largest tensor": max(n * k * (4 + 4 + 1), largest_plain)}
    parts["unaccounted"] = int(parts["largest tensor"] * SLACK)
    return MemoryPlan(sum(parts.values()), available_cpu(), model_free=True, parts=parts)


def fitting_options(model, spec, config, **kw) -> list[str]:
    """Options that would make a plan that does not fit fit, each checked by estimating
    again: fewer calibration samples, a smaller batch size."""
    from dataclasses import replace

    out = []
    if config.method != "rtn":
        if kw.get("activations", "auto") != "disk" and estimate(model, spec, config, **{**kw, "activations": "disk"}).fits:
            out.append("--activations disk")
        if config.batch_size > 1 and estimate(model, spec, replace(config, batch_size=1), **kw).fits:
            out.append("--batch-size 1")
        n = config.nsamples
        while n > 1:
            n //= 2
            if estimate(model, spec, replace(config, nsamples=n), **kw).fits:
                out.append(f"--nsamples {n}")
                break
    return out
