"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): a Qwen2 language model (q/k/v biases, RMSNorm
``x*w``) under ``model.language_model`` and a ViT with its patch merger under
``model.visual``, kept in float. The language blocks get 3-D multimodal rotary positions
(mrope), which the model computes in its own forward; the pipeline captures them."""

from qtool.models.base import LLAMA_LIKE_SCALE_GROUPS, LLAMA_LIKE_SEQUENTIAL, ArchSpec
from qtool.models.vlm import IMAGE_TEXT

SPEC = ArchSpec(
    name="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    blocks="model.language_model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=LLAMA_LIKE_SCALE_GROUPS,
    attention="self_attn",
    mlp="mlp",
    float_modules=("model.visual",),
    auto_class=IMAGE_TEXT,
)
