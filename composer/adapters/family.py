"""Which base model family a LoRA was trained for, from its keys and shapes alone."""

from __future__ import annotations

import re

from .types import LayerDelta

# Cross-attention key/value in-features (the text embedding width) of the real models.
_CROSS_ATTENTION_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
# Text-encoder hidden width of the first (or only) text encoder.
_TEXT_WIDTH = {768: "sd15", 1024: "sd2"}

_FLUX_MARKERS = ("double_blocks", "single_blocks", "single_transformer_blocks", "x_embedder", "guidance_embedder")
# SD3/3.5: a patch-embedding convolution, joint blocks with a second attention (3.5), two CLIPs and T5
_SD3_MARKERS = ("pos_embed", "transformer_blocks.0.attn2.")  # in transformer keys (UNets have attn2 too)
_SD3_WIDTHS = {1536, 2432}  # SD3/3.5 medium, 3.5 large (FLUX.1: 3072)
_CLIP_LAYERS = re.compile(r"^text_encoder_2\.(text_model\.)?encoder\.layers\.")  # SD3's second CLIP (FLUX's is T5)
_CROSS_ATTENTION = re.compile(r"\.attn2\.(to_k|to_v)$")
_SD_UNET = re.compile(r"^unet\.(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding)")
_EXTRA_TRANSFORMER_BLOCK = re.compile(r"\.transformer_blocks\.([1-9]\d*)\.")


def _in_width(d) -> int:
    """In-features of a Linear delta as its tensors tell them (-1: they do not; IA3 on outputs, OFT)."""
    return int(d.in_width)


def detect_family(deltas: dict[str, LayerDelta], keys=None) -> str:
    """``"flux"``, ``"sd3"``, ``"sdxl"``, ``"sd2"``, ``"sd15"`` or ``"unknown"``.

    ``deltas`` are canonical (``unet.down_blocks...``); ``keys`` optionally adds the file's raw keys,
    which still say ``double_blocks``/``input_blocks`` and the like.

    In order: FLUX keys; SD3 keys (a patch embedding, SD3.5's second attention, SD3's widths, a second CLIP or
    a third text encoder beside transformer keys); other transformer keys -> flux; a second text encoder or
    SDXL's ``add_embedding`` -> sdxl; the UNet's cross-attention in-features (768 sd15, 1024 sd2, 2048 sdxl);
    the text encoder's width for
    text-encoder-only files; then structure for models of other widths: several transformer blocks
    per attention (SDXL's ``transformer_layers_per_block``) -> sdxl, any other SD-style UNet or text
    encoder key -> sd15.
    """
    names = list(deltas)
    raw = list(keys) if keys is not None else []
    everything = names + raw

    transformer = [n for n in names if n.startswith("transformer.")]
    if any(m in k for k in everything for m in _FLUX_MARKERS):
        return "flux"
    if transformer:
        widths = {
            _in_width(d)
            for n, d in deltas.items()
            if n.startswith("transformer.transformer_blocks.")
            and n.endswith((".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out.0"))
        }
        if (
            any(m in n for n in transformer for m in _SD3_MARKERS)
            or widths & _SD3_WIDTHS
            or any(_CLIP_LAYERS.match(n) or n.startswith("text_encoder_3.") for n in names)
        ):
            return "sd3"
        return "flux"
    if any(n.startswith("text_encoder_2.") for n in names) or any(k.startswith("lora_te2_") for k in raw):
        return "sdxl"
    if any("add_embedding" in k or "label_emb" in k for k in everything):
        return "sdxl"

    widths = {_in_width(d) for n, d in deltas.items() if n.startswith("unet.") and _CROSS_ATTENTION.search(n)}
    for width in sorted(widths, reverse=True):  # a mixed file (should not happen): the widest wins
        if width in _CROSS_ATTENTION_WIDTH:
            return _CROSS_ATTENTION_WIDTH[width]

    unet = [n for n in names if _SD_UNET.match(n)]
    text = [n for n in names if n.startswith("text_encoder.")]
    if not unet and text:
        text_widths = {
            _in_width(d) for n, d in deltas.items() if n.startswith("text_encoder.") and n.endswith("q_proj")
        }
        for width in sorted(text_widths, reverse=True):
            if width in _TEXT_WIDTH:
                return _TEXT_WIDTH[width]

    if any(_EXTRA_TRANSFORMER_BLOCK.search(n) for n in unet):
        return "sdxl"
    if unet or text:
        return "sd15"
    return "unknown"
