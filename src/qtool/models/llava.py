"""LLaVA (``LlavaForConditionalGeneration``): a CLIP-style vision tower
(``model.vision_tower``) and projector (``model.multi_modal_projector``), kept in float,
feeding a Llama-like language model under ``model.language_model``. The block layout is
Llama's; a text model that differs is refused by the layout check before calibration."""

from qtool.models.base import LLAMA_LIKE_SCALE_GROUPS, LLAMA_LIKE_SEQUENTIAL, ArchSpec
from qtool.models.vlm import IMAGE_TEXT

SPEC = ArchSpec(
    name="llava",
    model_types=("llava",),
    blocks="model.language_model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=LLAMA_LIKE_SCALE_GROUPS,
    attention="self_attn",
    mlp="mlp",
    float_modules=("model.vision_tower", "model.multi_modal_projector"),
    auto_class=IMAGE_TEXT,
)
