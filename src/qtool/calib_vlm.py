"""Image-text calibration for vision-language models: ``--calib FILE.jsonl`` whose rows
have an ``image`` (a path, relative to the file's folder or absolute) and a ``text``.

Each row goes through the model's own processor (``AutoProcessor`` of the source folder),
so the language blocks see what they see in use: the image's tokens from the vision
tower and projector, and the model's multimodal positions (Qwen2-VL's 3-D mrope). The
prompt is the processor's chat template with the image before the text (one user turn);
a processor without a chat template gets ``processor.image_token`` before the text, and
a text that already holds that token is used as written. The text is cut to ``seqlen``
tokens before the image is added (the image's tokens are never cut). Rows are drawn by a
seeded permutation; each sample is one calibration chunk of its own length.

Text-only calibration (every other ``--calib``) stays the default for these models.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.errors import UserInputError


def is_image_text(calib: str | None) -> bool:
    """Whether ``calib`` is a ``.jsonl`` file whose first row has an ``image`` field."""
    if calib is None or not str(calib).endswith(".jsonl"):
        return False
    path = Path(calib).expanduser()
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and "image" in row
    return False


@dataclass(frozen=True)
class ImageTextCalibration:
    """Processed samples: ``input_ids`` is a list of model-input dicts (``input_ids``
    ``[1, L]``, ``attention_mask``, ``pixel_values``, ...), one calibration chunk each."""

    input_ids: list[dict]
    source: str
    sha256: str
    images: int

    def provenance(self) -> dict:
        lengths = [int(s["input_ids"].shape[1]) for s in self.input_ids]
        return {"source": self.source, "nsamples": len(lengths), "seqlen": max(lengths), "kind": "image-text",
                "images": self.images, "tokens": sum(lengths), "tokens_sha256": self.sha256}


def _prompt(processor, text: str) -> str:
    token = getattr(processor, "image_token", None)
    if token and token in text:
        return text
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not token:
        raise UserInputError("the model's processor has neither a chat template nor an image token: write the "
                             "image placeholder into each row's text, or calibrate on text with --calib FILE.txt")
    return f"{token}{text}"


def load_image_text(calib: str, model_folder: str | None, nsamples: int, seqlen: int, seed: int) -> ImageTextCalibration:
    """``nsamples`` rows of the image-text file ``calib`` run through the processor saved
    in ``model_folder``.

    Raises:
        UserInputError: no processor in the model folder (or a package it needs), a row
            without ``image``/``text``, a missing or unreadable image, or fewer rows than
            ``nsamples``; one line each.
    """
    from PIL import Image
    from transformers import AutoProcessor

    path = Path(calib).expanduser()
    if model_folder is None:
        raise UserInputError("image-text calibration needs the model's processor, which a .gguf source does not "
                             "have: quantize the Hugging Face folder, or calibrate on text with --calib FILE.txt")
    try:
        processor = AutoProcessor.from_pretrained(model_folder)
    except ImportError as exc:  # e.g. Qwen2-VL's video processor needs torchvision
        raise UserInputError(f"image-text --calib {calib}: the model's processor needs a package that is not "
                             f"installed ({' '.join(str(exc).split())[:160]}): install it (e.g. `pip install "
                             "torchvision`), or calibrate on text with --calib FILE.txt") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"image-text --calib {calib}: the model folder has no processor that reads images "
                             f"({str(exc).splitlines()[0][:120]}); add its preprocessor_config.json, or calibrate "
                             "on text with --calib FILE.txt") from exc
    if not hasattr(processor, "image_processor"):
        raise UserInputError(f"image-text --calib {calib}: the model's processor does not read images (no image "
                             "processor); calibrate on text with --calib FILE.txt")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{calib} line {n} is not JSON ({exc.msg}): one object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("text"), str):
                raise UserInputError(f"{calib} line {n}: each row needs an \"image\" path and a \"text\" string")
            rows.append(row)
    if len(rows) < nsamples:
        raise UserInputError(f"{calib} has {len(rows)} image-text rows, fewer than --nsamples {nsamples}: "
                             f"pass --nsamples {max(1, len(rows))} or add rows")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:nsamples].tolist()
    tokenizer = processor.tokenizer
    samples, digest = [], hashlib.sha256()
    for i in order:
        image_path = Path(rows[i]["image"]).expanduser()
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        try:
            with Image.open(image_path) as img:
                image = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{calib}: image {image_path} cannot be read ({exc}): fix the path in that row") from None
        ids = tokenizer(rows[i]["text"], add_special_tokens=False).input_ids[:seqlen]
        text = tokenizer.decode(ids)
        inputs = processor(images=[image], text=[_prompt(processor, text)], return_tensors="pt")
        sample = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        samples.append(sample)
        for key in sorted(sample):
            digest.update(key.encode())
            digest.update(sample[key].contiguous().numpy().tobytes())
    return ImageTextCalibration(samples, f"file:{os.path.abspath(path)}", digest.hexdigest(), len(samples))
