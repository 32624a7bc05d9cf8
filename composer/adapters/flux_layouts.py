"""FLUX.1 LoRA key layouts of other trainers and tools, renamed to a layout :mod:`.formats` parses (as ComfyUI's
key maps do; written from the layouts, not from its code).

- BFL / ComfyUI names: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` (or ``.lora_down.weight``,
  ``.alpha``; optionally under ``base_model.model.``). BFL's module names are what kohya's layer names spell
  with underscores, so each key becomes a kohya key (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``)
  and the kohya FLUX parser (fused q, k, v split at the file's widths, alphas kept) does the rest.
- OneTrainer: ``lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight``: diffusers' module names
  with underscores, which become diffusers keys (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``)
  by reading the name against the FLUX transformer's module-name parts. Its text-encoder keys are kohya's.
"""

from __future__ import annotations

BFL_ROOTS = (
    "double_blocks.",
    "single_blocks.",
    "final_layer.",
    "img_in.",
    "txt_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
)
_BFL_WRAPPERS = ("base_model.model.", "diffusion_model.")
_TO_KOHYA = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight",
    "lora_up.weight": "lora_up.weight",
    "alpha": "alpha",
}

# kohya layer names that only a FLUX.1 transformer has, beside its double and single blocks
KOHYA_FLUX_LAYERS = (
    "lora_unet_img_in.",
    "lora_unet_txt_in.",
    "lora_unet_time_in_",
    "lora_unet_vector_in_",
    "lora_unet_guidance_in_",
    "lora_unet_final_layer_",
)

ONETRAINER_PREFIX = "lora_transformer_"
_TO_DIFFUSERS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
# the parts of FluxTransformer2DModel's Linear module names, longest first where one begins another
_PARTS = sorted(
    {
        "transformer_blocks",
        "single_transformer_blocks",
        "attn",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff",
        "ff_context",
        "net",
        "proj",
        "proj_mlp",
        "proj_out",
        "norm",
        "norm1",
        "norm1_context",
        "linear",
        "x_embedder",
        "context_embedder",
        "norm_out",
        "time_text_embed",
        "timestep_embedder",
        "guidance_embedder",
        "text_embedder",
        "linear_1",
        "linear_2",
    },
    key=len,
    reverse=True,
)


def _split(key: str, suffixes) -> tuple[str, str] | None:
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def bfl_to_kohya(keys) -> dict[str, str] | None:
    """``{key: kohya key}`` when every key is a BFL-named FLUX LoRA key, else None."""
    out = {}
    for key in keys:
        bare = key
        for wrapper in _BFL_WRAPPERS:
            bare = bare.removeprefix(wrapper)
        split = _split(bare, _TO_KOHYA)
        if split is None or not bare.startswith(BFL_ROOTS):
            return None
        module, suffix = split
        out[key] = f"lora_unet_{module.replace('.', '_')}.{_TO_KOHYA[suffix]}"
    return out or None


def _dotted(name: str) -> str | None:
    """``transformer_blocks_0_attn_to_out_0`` -> ``transformer_blocks.0.attn.to_out.0`` (None: not a FLUX name)."""
    tokens, parts, i = name.split("_"), [], 0
    while i < len(tokens):
        for j in range(len(tokens), i, -1):
            candidate = "_".join(tokens[i:j])
            if candidate.isdigit() or candidate in _PARTS:
                parts.append(candidate)
                i = j
                break
        else:
            return None
    return ".".join(parts)


def onetrainer_to_diffusers(keys, is_text_key) -> tuple[dict[str, str], str | None]:
    """``({key: diffusers key}, None)`` for a OneTrainer FLUX file's transformer keys (``is_text_key(key)``: a
    text-encoder key, left to the kohya parser), or ``({}, key)`` naming the first key that does not read."""
    out = {}
    for key in keys:
        if is_text_key(key):
            continue
        name, _, suffix = key.partition(".")
        path = _dotted(name[len(ONETRAINER_PREFIX) :]) if name.startswith(ONETRAINER_PREFIX) else None
        if path is None or suffix not in _TO_DIFFUSERS:
            return {}, key
        out[key] = f"transformer.{path}.{_TO_DIFFUSERS[suffix]}"
    return out, None
