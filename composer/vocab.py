"""The words every layer shares: pipeline component names, layer groups, LoRA file extensions, families.

One place, so the adapter readers, the runtime, the strategies, the retriever and the front ends agree on
them. Plain data and string functions only (no torch, no diffusers): anything may import it.
"""

from __future__ import annotations

# Pipeline components that carry adapter deltas, as diffusers names them (adapter keys start with one).
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENTS = DENOISERS + TEXT_ENCODERS

# Cross-attention key/value projections: where a LoRA reads the prompt (gates and retrieval use them).
CROSS_ATTENTION_KV = (".attn2.to_k", ".attn2.to_v")

# LoRA files: safetensors first (preferred when a name matches several files), then the pickle-based
# formats, which are read only when the user allows it (unpickling can run code).
SAFE_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".pt", ".ckpt", ".bin", ".pth")
LORA_EXTENSIONS = SAFE_EXTENSIONS + PICKLE_EXTENSIONS

# A model folder may say how images are recorded and what guidance it renders at unless told:
# ``{"name": "miniworld", "guidance_scale": 5.0}`` in this file beside ``model_index.json``.
MODEL_DEFAULTS_FILE = "lora-composer.json"
DEFAULT_GUIDANCE = 7.5  # any other model (diffusers' Stable Diffusion default)
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes

# The weight of a LoRA nobody gave a weight for: a bare ``<lora:name>`` tag, a name on the command line, an
# automatic pick whose file states no preferred weight. AUTOMATIC1111's default multiplier.
DEFAULT_LORA_WEIGHT = 1.0

# Base-model families an adapter or a pipeline belongs to.
FAMILIES = ("sd15", "sd2", "sdxl", "flux", "sd3", "unknown")

_BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def layer_group(key: str) -> str:
    """Coarse block a layer belongs to, for per-layer-group weights: ``unet.down_blocks.1``,
    ``unet.mid_block``, ``unet.up_blocks.0``, ``text_encoder``, ``transformer.transformer_blocks.3``..."""
    parts = key.split(".")
    if len(parts) > 2 and parts[1] in _BLOCK_LISTS:
        return ".".join(parts[:3])
    if len(parts) > 1 and parts[0] in DENOISERS:
        return ".".join(parts[:2])
    return parts[0]


def pipeline_family(pipe) -> str:
    """Base family of a diffusers pipeline, from its class and denoiser config."""
    name = type(pipe).__name__
    if "Flux" in name:
        return "flux"
    if "StableDiffusion3" in name:
        return "sd3"
    if "XL" in name:
        return "sdxl"
    unet = getattr(pipe, "unet", None)
    if "StableDiffusion" in name and unet is not None:
        return "sd2" if unet.config.cross_attention_dim == 1024 else "sd15"
    return "unknown"
