"""Vision-language models: mini random-init Qwen2-VL, Qwen2.5-VL, Gemma3 (image-text) and
LLaVA (Llama text model) built from their transformers config classes, each with a small
vision tower and a two-layer language model.

* only the language blocks are quantized: the coverage line counts exactly their linears
  and reports the vision tower and projector as kept in float;
* RTN, GPTQ and AWQ (all families' folds prove) run end to end to compressed-tensors;
  transformers loads the checkpoint as the same class, under the key names its own
  ``save_pretrained`` writes, with logits on a text input matching qtool's reading; the
  vision tower and projector are bit-equal to the source; GPTQ-format checkpoints read
  back into the same model;
* text-only calibration gives every language block the arguments of the real forward
  (Qwen2-VL's rotary tables from its mrope positions, Gemma3's local/global masks);
* image-text calibration (``--calib`` .jsonl of image/text rows) runs each pair through
  the model's processor and the whole model; its errors are one line each.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
VOCAB = 49152  # the shared tokenizer's
LAYERS = 2
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
SPECIAL = range(VOCAB - 8, VOCAB)  # image/video/boundary token ids, at the end of the vocabulary


def _config(family: str):
    import transformers

    img, vid, start, end = SPECIAL[0], SPECIAL[1], SPECIAL[2], SPECIAL[3]
    if family == "qwen2_vl":
        return transformers.Qwen2VLConfig(
            text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
            vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
            image_token_id=img, video_token_id=vid, vision_start_token_id=start, vision_end_token_id=end,
            tie_word_embeddings=True)
    if family == "qwen2_5_vl":  # window attention in block 0, full attention in block 1
        return transformers.Qwen2_5_VLConfig(
            text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               fullatt_block_indexes=[1], window_size=56),
            image_token_id=img, video_token_id=vid, vision_start_token_id=start, vision_end_token_id=end,
            tie_word_embeddings=True)
    if family == "gemma3_vl":
        return transformers.Gemma3Config(
            text_config={**TEXT, "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 8,
                         "layer_types": ["sliding_attention", "full_attention"]},
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=img, boi_token_index=start, eoi_token_index=end)
    return transformers.LlavaConfig(
        text_config={**TEXT, "model_type": "llama"},
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        image_token_index=img, tie_word_embeddings=True)


CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "gemma3_vl": "Gemma3ForConditionalGeneration",
           "llava": "LlavaForConditionalGeneration"}
VISION = {"qwen2_vl": ("model.visual",), "qwen2_5_vl": ("model.visual",), "gemma3_vl": ("model.vision_tower", "model.multi_modal_projector"),
          "llava": ("model.vision_tower", "model.multi_modal_projector")}


def mini_model(family: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[family])(_config(family)).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                # away from the init (ones or zeros) so that folding a scale into a norm is visible
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if family == "gemma3_vl" else 1.0))
    return model


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory, default_model_dir) -> dict:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vlm")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    out = {}
    for family in CLASSES:
        folder = root / family
        mini_model(family).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "test", "size": 28}))
        out[family] = folder
    return out


def _ids(n: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB - 8, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def _linear_params(model, prefix: str) -> tuple[int, int]:
    """(count, elements) of the ``nn.Linear`` weights under ``prefix``: an independent
    count of what should be quantized."""
    lins = [m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)]
    return len(lins), sum(m.weight.numel() for m in lins)


METHOD_ARGS = {"rtn": ["--method", "rtn", "--sym"], "gptq": ["--method", "gptq", "--sym", "--no-act-order"],
               "awq": ["--method", "awq"]}


def _quantize(capsys, src, out, calib, *extra):
    return run_cli(capsys, "-q", "--json", "quantize", src, "-o", out, *extra, "-g", "32",
                   "--format", "compressed-tensors", "--calib", calib, "--nsamples", "4", "--seqlen", "32")


# every family, every method at least once: RTN, AWQ and GPTQ on Qwen2-VL / Qwen2.5-VL (mrope positions),
# AWQ's (1 + w) folds on Gemma3, RTN on LLaVA (whose GPTQ runs with image-text calibration below)
RUNS = [("qwen2_vl", "rtn"), ("qwen2_vl", "awq"), ("qwen2_5_vl", "gptq"), ("gemma3_vl", "awq"), ("llava", "rtn")]
ARCHITECTURE = {"qwen2_5_vl": "qwen2_vl"}  # one family file covers both


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize(("family", "method"), RUNS)
def test_transformers_loads_the_same_class(capsys, tmp_path, vlm_dirs, calib_txt, family, method):
    import transformers
    from safetensors import safe_open
    from transformers import CompressedTensorsConfig

    from qtool.api import load_any
    from qtool.io import read_quantized_layers

    src, out = vlm_dirs[family], tmp_path / "ckpt"
    res = _quantize(capsys, src, out, calib_txt, *METHOD_ARGS[method])
    assert res.code == 0, res.err
    record = res.json()
    assert record["model"]["architecture"] == ARCHITECTURE.get(family, family)
    source = mini_model(family)
    # the names on disk are those transformers' own save_pretrained writes
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        src_keys = set(f.keys())
    qweights, plain, _, _ = read_quantized_layers(out)
    biases = {f"{n}.bias" for n, qw in qweights.items() if qw.bias is not None}
    assert {f"{n}.weight" for n in qweights} | biases | set(plain) == src_keys
    # coverage: exactly the language blocks' linears
    blocks = "model.language_model.layers"
    count, params = _linear_params(source, blocks)
    cov = record["coverage"]
    assert (cov["quantized"], cov["quantized_params"]) == (count, params) == (7 * LAYERS, cov["quantized_params"])
    assert len(record["layers"]) == count
    vision_params = sum(p.numel() for n, p in source.named_parameters() if n.startswith(VISION[family]))
    assert cov["kept_in_float"]["float_modules"]["params"] == vision_params
    assert "float_modules" in cov["line"] or "vision" in cov["line"]
    # the vision tower and projector are bit-equal to the source's
    with safe_open(str(out / "model.safetensors"), "pt") as got, safe_open(str(src / "model.safetensors"), "pt") as ref:
        vision = [k for k in ref.keys() if k.startswith(("visual.", "vision_tower.", "multi_modal_projector."))]
        assert vision
        for k in vision:
            assert torch.equal(got.get_tensor(k), ref.get_tensor(k)), k
    assert (out / "preprocessor_config.json").is_file()
    assert "AutoModelForImageTextToText.from_pretrained" in (out / "README.md").read_text()  # the card's snippet
    theirs = transformers.AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    assert type(theirs).__name__ == CLASSES[family]
    for prefix in VISION[family]:  # transformers read the vision tower from the file (not initialized)
        for name, param in source.get_submodule(prefix).named_parameters():
            assert torch.equal(theirs.get_submodule(prefix).get_parameter(name), param), f"{prefix}.{name}"
    ours, _, _ = load_any(str(out))
    assert type(ours).__name__ == CLASSES[family]
    ids = _ids(2, 24, seed=3)
    expected = _logits(ours, ids)
    assert torch.isfinite(expected).all()
    got = _logits(theirs, ids)
    diff = (got - expected).abs().max().item()
    assert diff <= 2e-3 * max(1.0, expected.abs().max().item()), diff
    # transformers' quantized linear holds qtool's dequantized weight (float16-rounded)
    name = f"{blocks}.1.mlp.down_proj"
    disk = next(k for k in qweights if k.endswith("layers.1.mlp.down_proj"))
    ref_w = qweights[disk].dequantize(torch.float16).float()
    assert torch.equal(theirs.get_submodule(name).weight.float(), ref_w)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "gemma3_vl"])
def test_every_language_block_gets_the_inputs_of_the_real_forward(family):
    """Text-only calibration runs the whole model: each language block's captured hidden
    states and keyword arguments (Qwen2-VL's rotary tables from its mrope positions,
    Gemma3's local/global masks) equal those a hooked forward of the model passes it."""
    from test_architectures import _assert_same, _Recorder

    from qtool.config import QuantizeConfig
    from qtool.models import get_blocks, spec_for
    from qtool.pipeline import quantize_model

    model = mini_model(family)
    spec = spec_for(model)
    assert spec.blocks == "model.language_model.layers"
    ids = _ids(4, 16)
    real: dict[int, list] = {}

    def hook(i):
        def pre(module, args, kwargs):
            hidden = kwargs.pop("hidden_states") if not args else args[0]
            real.setdefault(i, []).append((hidden.clone(), dict(kwargs)))

        return pre

    blocks = get_blocks(model, spec)
    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for start in range(0, 4, 2):
            _logits(model, ids[start:start + 2])
    finally:
        for h in handles:
            h.remove()
    recorder = _Recorder()
    quantize_model(model, spec, recorder, QuantizeConfig(method="rtn", group_size=32, batch_size=2), ids,
                   torch.device("cpu"))
    assert len(recorder.seen) == len(blocks) == LAYERS
    for i, (hidden, kwargs) in enumerate(recorder.seen):
        assert len(hidden) == len(real[i]) == 2
        for c, (h, kw) in enumerate(zip(hidden, kwargs)):
            torch.testing.assert_close(h, real[i][c][0], rtol=1e-6, atol=1e-6)
            _assert_same(kw, real[i][c][1], f"block {i} chunk {c}")
            assert "position_embeddings" in kw


def test_every_format_reads_back_the_same_language_model(capsys, tmp_path, vlm_dirs, calib_txt):
    """The same RTN codes written as GPTQ and as compressed-tensors read back (qtool's
    reader, under the disk names) into the same model: identical logits, the vision tower
    equal to the source's."""
    from qtool.api import load_any

    logits = {}
    for fmt in ("compressed-tensors", "gptq"):
        out = tmp_path / fmt
        res = run_cli(capsys, "-q", "--json", "quantize", vlm_dirs["qwen2_vl"], "-o", out, "--method", "rtn", "--sym",
                      "-g", "32", "--format", fmt)
        assert res.code == 0, res.err
        model, _, info = load_any(str(out))
        assert info["quantized"] and type(model).__name__ == CLASSES["qwen2_vl"]
        logits[fmt] = _logits(model, _ids(1, 16, seed=5))
        ref = mini_model("qwen2_vl")
        for name, param in ref.model.visual.named_parameters():
            assert torch.equal(model.model.visual.get_parameter(name), param), name
    assert torch.equal(logits["gptq"], logits["compressed-tensors"])
    # converted to compressed-tensors, transformers loads it with the vision tower left in float
    import transformers

    conv = tmp_path / "converted"
    res = run_cli(capsys, "-q", "convert", tmp_path / "gptq", "--to", "compressed-tensors", "-o", conv)
    assert res.code == 0, res.err
    theirs = transformers.AutoModelForImageTextToText.from_pretrained(conv, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(theirs, _ids(1, 16, seed=5)), logits["gptq"], rtol=2e-3, atol=2e-3)
    for name, param in ref.model.visual.named_parameters():  # read from the file, not initialized
        assert torch.equal(theirs.model.visual.get_parameter(name), param), name


# --- image-text calibration ---------------------------------------------------------------

@pytest.fixture(scope="module")
def llava_with_processor(tmp_path_factory, default_model_dir):
    """A mini LLaVA whose folder holds a real processor (CLIP image processor, the shared
    tokenizer plus ``<image>``), two images and an image-text calibration file."""
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    root = tmp_path_factory.mktemp("llava-proc")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    config = _config("llava")
    config.text_config.vocab_size = len(tok)
    config.image_token_index = config.image_token_id = image_id
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    folder = root / "model"
    model.save_pretrained(folder, safe_serialization=True)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
                   tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1,
                   chat_template="{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                                 "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}").save_pretrained(folder)
    rows = []
    for i in range(3):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "text": f"A picture of {i} things, the quick brown fox jumps over the dog."})
    calib = root / "pairs.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, calib, image_id


def test_image_text_calibration_feeds_the_real_multimodal_inputs(llava_with_processor):
    """Each image-text row goes through the processor and the whole model: block 0's
    captured hidden states hold the projected image features at the image tokens (not the
    ``<image>`` embedding) and every block's inputs equal a hooked real forward's."""
    from test_architectures import _assert_same

    from qtool.calib_vlm import is_image_text, load_image_text
    from qtool.models import get_blocks, spec_for
    from qtool.pipeline import capture_inputs

    folder, calib, image_id = llava_with_processor
    assert is_image_text(str(calib))
    data = load_image_text(str(calib), str(folder), nsamples=2, seqlen=8, seed=0)
    assert data.provenance()["images"] == 2 and len(data.input_ids) == 2
    sample = data.input_ids[0]
    assert "pixel_values" in sample and (sample["input_ids"] == image_id).sum() == 4
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    spec = spec_for(model)
    real: dict[int, list] = {}
    handles = [b.register_forward_pre_hook(lambda m, a, kw, i=i: real.setdefault(i, []).append((a[0].clone(), dict(kw))),
                                           with_kwargs=True) for i, b in enumerate(get_blocks(model, spec))]
    with torch.inference_mode():
        for s in data.input_ids:
            model(**s, use_cache=False)
    for h in handles:
        h.remove()
    captured = capture_inputs(model, spec, data.input_ids, 1, torch.device("cpu"), torch.float32)
    for c, hidden in enumerate(captured.hidden):
        torch.testing.assert_close(hidden, real[0][c][0], rtol=0, atol=0)
        for i in range(LAYERS):
            _assert_same(captured.block_kwargs[i][c], real[i][c][1], f"block {i} chunk {c}")
    at_image = captured.hidden[0][0][sample["input_ids"][0] == image_id]
    embedding = model.get_input_embeddings().weight[image_id]
    assert not torch.allclose(at_image, embedding.expand_as(at_image))


def test_image_text_calibration_end_to_end(capsys, tmp_path, llava_with_processor):
    from qtool.api import load_any

    folder, calib, _ = llava_with_processor
    out = tmp_path / "ckpt"
    res = run_cli(capsys, "-q", "--json", "quantize", folder, "-o", out, "--method", "gptq", "--sym", "--no-act-order",
                  "-g", "32", "--format", "compressed-tensors", "--calib", calib, "--nsamples", "2", "--seqlen", "8")
    assert res.code == 0, res.err
    record = res.json()
    assert record["calibration"]["kind"] == "image-text" and record["calibration"]["images"] == 2
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "qtool-output.schema.json").read_text())
    jsonschema.validate(record, schema)
    assert record["coverage"]["quantized"] == 7 * LAYERS
    assert (out / "processor_config.json").is_file()
    model, _, _ = load_any(str(out))
    assert torch.isfinite(_logits(model, _ids(1, 8))).all()


def test_image_text_calibration_without_an_image_processor_is_refused(capsys, tmp_path, vlm_dirs, llava_with_processor):
    """A model folder whose processor cannot read images: one line naming the fix, nothing written."""
    _, calib, _ = llava_with_processor
    out = tmp_path / "ckpt"
    res = run_cli(capsys, "quantize", vlm_dirs["gemma3_vl"], "-o", out, "--method", "gptq", "--calib", calib,
                  "--nsamples", "2", "-g", "32")
    assert res.code != 0
    assert "processor" in res.err and "--calib FILE.txt" in res.err, res.err
    assert not out.exists()


def test_image_text_calibration_file_errors(tmp_path, vlm_dirs, llava_with_processor):
    """Each wrong input is one line naming the problem and the fix."""
    import importlib.util
    import shutil

    from qtool.calib_vlm import load_image_text
    from qtool.errors import UserInputError

    folder, calib, _ = llava_with_processor
    with pytest.raises(UserInputError, match="fewer than --nsamples 9: pass --nsamples 3"):
        load_image_text(str(calib), str(folder), nsamples=9, seqlen=8, seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nowhere.png", "text": "a"}) + "\n")
    with pytest.raises(UserInputError, match="nowhere.png cannot be read.*fix the path"):
        load_image_text(str(bad), str(folder), nsamples=1, seqlen=8, seed=0)
    bad.write_text(json.dumps({"picture": "x.png", "text": "a"}) + "\n")
    with pytest.raises(UserInputError, match="line 1: each row needs an \"image\" path and a \"text\""):
        load_image_text(str(bad), str(folder), nsamples=1, seqlen=8, seed=0)
    if importlib.util.find_spec("torchvision") is None:  # Qwen2-VL's processor needs it for its video processor
        qwen = tmp_path / "qwen"
        shutil.copytree(vlm_dirs["qwen2_vl"], qwen)
        (qwen / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}))
        with pytest.raises(UserInputError, match="needs a package that is not installed.*pip install torchvision"):
            load_image_text(str(calib), str(qwen), nsamples=1, seqlen=8, seed=0)
