"""Kohya (sd-scripts) FLUX.1 LoRA keys that diffusers' converter gets wrong, converted here.

``_convert_kohya_flux_lora_to_diffusers`` is right for the double blocks and CLIP, and
:mod:`.formats` uses it for them. Three things it is not right for:

- ``single_blocks_N_linear1`` (BFL's fused q, k, v and MLP input): it splits the up weight at FLUX.1-dev's
  widths (3 x 3072 + 12288) whatever the model; here at the file's own, ``[d, d, d, 4d]`` with ``d`` = rows / 7
  (FLUX's MLP ratio is 4), so a FLUX-shaped model of any width loads (and a wrong width fails on the layer);
- ``final_layer_*``: it ignores their alphas (``proj_out``, and ``norm_out.linear`` with BFL's shift/scale
  halves swapped to diffusers' scale/shift);
- T5 (``lora_te2_encoder_block_N_layer_M_...``): it drops them with a log line;
- the embedders (``img_in``, ``txt_in``, ``time_in_*``, ``vector_in_*``, ``guidance_in_*``) beside the blocks:
  one Linear each, mapped here by name.

Alphas stay alphas here (the delta is ``alpha / rank * up @ down``), not baked into the factors.
"""

from __future__ import annotations

import re

import torch

from .formats import FormatError, _alpha_value, _pair
from .types import LayerDelta

_SINGLE_LINEAR1 = re.compile(r"^lora_unet_single_blocks_(\d+)_linear1$")
_FINAL = {
    "lora_unet_final_layer_linear": "transformer.proj_out",
    "lora_unet_final_layer_adaLN_modulation_1": "transformer.norm_out.linear",
}
_EMBED = "transformer.time_text_embed"
EMBEDDERS = {  # BFL's embedders (kohya names) -> diffusers' modules: plain Linears, one to one
    "lora_unet_img_in": "transformer.x_embedder",
    "lora_unet_txt_in": "transformer.context_embedder",
    "lora_unet_time_in_in_layer": f"{_EMBED}.timestep_embedder.linear_1",
    "lora_unet_time_in_out_layer": f"{_EMBED}.timestep_embedder.linear_2",
    "lora_unet_vector_in_in_layer": f"{_EMBED}.text_embedder.linear_1",
    "lora_unet_vector_in_out_layer": f"{_EMBED}.text_embedder.linear_2",
    "lora_unet_guidance_in_in_layer": f"{_EMBED}.guidance_embedder.linear_1",
    "lora_unet_guidance_in_out_layer": f"{_EMBED}.guidance_embedder.linear_2",
}
_T5 = re.compile(r"^lora_te2_encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)$")


def is_own(name: str) -> bool:
    """Whether kohya layer ``name`` is converted here rather than by diffusers."""
    return bool(_SINGLE_LINEAR1.match(name)) or name in _FINAL or name in EMBEDDERS or name.startswith("lora_te2_")


def split_fused(
    name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None, dims: list[int]
) -> list[LayerDelta]:
    """One delta per output slice ``dims`` of a fused layer. The down weight is shared by every slice, unless
    the up weight is block-diagonal over equal rank slices (a fused file written from separate LoRAs): then
    each slice keeps its own rank columns. Either way the slices' deltas are exactly the fused delta's rows."""
    if sum(dims) != up.shape[0]:
        raise FormatError(f"layer {name}: up weight has {up.shape[0]} rows, expected {' + '.join(map(str, dims))}")
    rank, n = int(down.shape[0]), len(dims)
    alpha = float(rank if alpha is None else alpha)
    ups = list(torch.split(up, dims, dim=0))
    if rank % n == 0:
        r = rank // n
        blocks = [u[:, i * r : (i + 1) * r] for i, u in enumerate(ups)]
        if not any(u[:, j * r : (j + 1) * r].any() for i, u in enumerate(ups) for j in range(n) if j != i):
            # alpha / rank is the scale: each slice of rank r keeps it with alpha / n
            return [_pair(name, down[i * r : (i + 1) * r], b.contiguous(), alpha / n) for i, b in enumerate(blocks)]
    return [_pair(name, down, u.contiguous(), alpha) for u in ups]


def _t5_module(name: str) -> str:
    m = _T5.match(name)
    if m is None:
        raise FormatError(f"unknown T5 layer in kohya FLUX LoRA (key {name!r})")
    block, layer, kind, proj = m.groups()
    return f"text_encoder_2.encoder.block.{block}.layer.{layer}.{kind}.{proj}"


def own_deltas(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, LayerDelta]:
    """Canonical deltas of the kohya layers :func:`is_own` claims (``groups``: layer name -> its tensors by
    suffix, ``lora_down.weight``, ``lora_up.weight``, ``alpha``)."""
    deltas: dict[str, LayerDelta] = {}
    for name, parts in groups.items():
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        _pair(name, down, up, None)  # raises on a missing half or bad shapes
        alpha = _alpha_value(name, parts["alpha"]) if "alpha" in parts else None
        single = _SINGLE_LINEAR1.match(name)
        if single:
            if up.dim() != 2 or up.shape[0] % 7:
                raise FormatError(
                    f"layer {name}: up weight {tuple(up.shape)} is not FLUX's fused q, k, v, mlp (rows = 7 x width)"
                )
            d = up.shape[0] // 7
            prefix = f"transformer.single_transformer_blocks.{single.group(1)}"
            targets = [f"{prefix}.attn.to_q", f"{prefix}.attn.to_k", f"{prefix}.attn.to_v", f"{prefix}.proj_mlp"]
            deltas.update(zip(targets, split_fused(name, down, up, alpha, [d, d, d, 4 * d])))
        elif name in _FINAL:
            if name.endswith("adaLN_modulation_1"):  # BFL: (shift, scale); diffusers' norm_out: (scale, shift)
                shift, scale = up.chunk(2, dim=0)
                up = torch.cat([scale, shift], dim=0)
            deltas[_FINAL[name]] = _pair(name, down, up, alpha)
        elif name in EMBEDDERS:
            deltas[EMBEDDERS[name]] = _pair(name, down, up, alpha)
        else:
            deltas[_t5_module(name)] = _pair(name, down, up, alpha)
    return deltas
