"""Gemma3 image-text (``Gemma3ForConditionalGeneration``, ``model_type "gemma3"``): the
Gemma3 text blocks (``qtool.models.gemma3``) under ``model.language_model``, a SigLIP
vision tower (``model.vision_tower``) and the projector (``model.multi_modal_projector``),
both kept in float."""

from qtool.models.base import LLAMA_LIKE_SEQUENTIAL, ArchSpec, Producer, pre_norm_scale_groups
from qtool.models.vlm import IMAGE_TEXT

SPEC = ArchSpec(
    name="gemma3_vl",
    model_types=("gemma3",),
    blocks="model.language_model.layers",
    sequential=LLAMA_LIKE_SEQUENTIAL,
    scale_groups=pre_norm_scale_groups(Producer.RMSNORM_ONE_PLUS, mlp_norm="pre_feedforward_layernorm"),
    attention="self_attn",
    mlp="mlp",
    float_modules=("model.vision_tower", "model.multi_modal_projector"),
    auto_class=IMAGE_TEXT,
)
