"""Per-layer sensitivity (``qtool.sensitivity``): the KL of the model with one layer
quantized, checked against a computation written here (its own group quantizer and
``torch.nn.functional.kl_div``), and the model left exactly as it was."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_awq import _ids, _model


def _own_rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max round to nearest per group of ``group`` inputs (float32)."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(n, k)


def test_kl_of_one_quantized_layer_matches_an_independent_computation():
    from qtool.models import spec_for
    from qtool.sensitivity import layer_sensitivity

    model = _model("llama", outliers=(3, 40))
    ids = _ids(4, 32, seed=2)
    spec = spec_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    got = layer_sensitivity(model, spec, ids, (4, 8), group_size=32, sym=False, batch_size=2, names=names)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # every weight put back
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=ids).logits, -1)
        for name in names:
            lin = model.get_submodule(name)
            w = lin.weight.data.clone()
            for bits in (4, 8):
                lin.weight.data = _own_rtn(w, bits, 32)
                logp = F.log_softmax(model(input_ids=ids).logits, -1)
                want = F.kl_div(logp.reshape(-1, logp.shape[-1]), ref.reshape(-1, ref.shape[-1]), log_target=True,
                                reduction="batchmean").item()
                # qtool stores float16 scales (fitted to the group): close, not equal
                assert abs(got[name][bits] - want) <= 0.05 * want + 1e-7, (name, bits, got[name][bits], want)
            lin.weight.data = w
        assert got[name][8] < got[name][4] / 20  # 8 bits is far less sensitive


def test_skipping_the_blocks_before_the_layer_gives_the_same_numbers():
    """The blocks before a layer's own return its block's float input instead of computing
    it: every KL equals the whole forward's, bit for bit, for single linears and groups."""
    from qtool.models import spec_for
    from qtool.sensitivity import layer_sensitivity

    model = _model("llama", outliers=(3, 40))
    ids = _ids(4, 32, seed=3)
    spec = spec_for(model)
    items = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj",
             ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")]
    fast = layer_sensitivity(model, spec, ids, (4,), group_size=32, sym=True, batch_size=2, names=items)
    whole = layer_sensitivity(model, spec, ids, (4,), group_size=32, sym=True, batch_size=2, names=items,
                              skip_blocks=False)
    assert fast == whole and all(v[4] > 0 for v in fast.values())
    assert all("forward" not in b.__dict__ for b in model.model.layers)  # the stand-ins are gone
