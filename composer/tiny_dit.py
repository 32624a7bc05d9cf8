"""Tiny FLUX.1- and SD3-shaped pipelines and random LoRAs for them, built offline from configs.

The DiT counterparts of :mod:`lora_composer.tiny`: every layer kind the real models have (joint attention
with its ``add_*_proj``, single blocks' fused ``proj_mlp``/``proj_out``, modulation linears, CLIP and T5
text encoders, FLUX-dev's guidance embedding) at toy widths, so the tests run the real diffusers
pipelines on a CPU in well under a second. The CLIP tokenizer is the real BPE (see ``tiny``); the T5
tokenizer is a character-level unigram model built in code (T5's own needs a sentencepiece download).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from lora_composer.tiny import _text_config, clip_tokenizer

# Linear layers a FLUX LoRA trains (ai-toolkit / kohya "all linear" presets), by module-name suffix.
FLUX_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "proj_mlp",
    "proj_out",
    "norm_out.linear",
)
SD3_TARGETS = FLUX_TARGETS  # SD3's joint blocks name their layers the same way (no single blocks)
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
T5_TARGETS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "wi_0", "wi_1", "wo")


def t5_tokenizer():
    """A T5 tokenizer (unigram, ``</s>`` appended, ``<pad>`` = 0) over lower-case letters, digits and
    punctuation, one piece per character (``▁x`` at a word's start)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in string.ascii_lowercase + string.digits]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + ",.!?'-:;()"]
    pieces += [("▁", -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()  # built, not loaded: in training mode, and T5 has dropout


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    # one block: no downsampling (VAE scale factor 1), as in diffusers' own DiT pipeline tests
    return AutoencoderKL(
        block_out_channels=(4,),
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        sample_size=32,
    )


def _flow_scheduler(dynamic: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:  # FLUX.1-dev's scheduler config: the shift follows the image's token count
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline with FLUX.1's structure at toy size: one double and one single block, CLIP + T5,
    a guidance embedding (FLUX.1-dev; ``guidance_embeds=False`` is schnell's shape). Renders any multiple
    of 2 pixels (16x16 in the tests)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    text_encoder = CLIPTextModel(_text_config())
    tokenizer_2 = t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=_flow_scheduler(dynamic=True),
        vae=_vae(latent_channels=1),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(tokenizer_2, d_model=32),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = 16  # FluxPipeline says 128 (1024 pixels at FLUX's VAE factor 8): 16x16 here, as SD3's
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline with SD3's structure at toy size: two joint blocks (the last one
    ``context_pre_only``, as in SD3), patch size 2, two CLIP text encoders with projection and T5."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # prompt embeddings: both CLIPs' hidden states side by side (2 x 32), padded to T5's width (64)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    )
    tokenizer_3 = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(dynamic=False),
        vae=_vae(latent_channels=4),
        text_encoder=CLIPTextModelWithProjection(_text_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(tokenizer_3, d_model=64),
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _linear_targets(module: torch.nn.Module, suffixes):
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes):
            yield name, sub


def random_dit_lora_layers(
    pipe,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.1,
    text_encoders=("text_encoder",),
    targets=None,
    shared_down: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT-format LoRA layers per component (``{"transformer": {"transformer_blocks.0.attn.to_q.lora_A.weight":
    ...}, "text_encoder": {...}}``) on every Linear a FLUX/SD3 LoRA trains (``targets``: module-name suffixes
    of the transformer's). Both factors random (PEFT's zero ``lora_B`` would hide every bug).
    ``shared_down``: the layers BFL's checkpoint fuses (q, k, v; a single block's q, k, v and MLP input)
    share one down weight, as in a LoRA trained on the fused layer (sd-scripts)."""
    gen = torch.Generator().manual_seed(seed)
    components = {"transformer": (pipe.transformer, tuple(targets or FLUX_TARGETS))}
    for name in text_encoders:
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            t5 = type(encoder).__name__.startswith("T5")
            components[name] = (encoder, T5_TARGETS if t5 else CLIP_TARGETS)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for comp, (module, suffixes) in components.items():
        sd = {}
        for name, sub in _linear_targets(module, suffixes):
            sd[f"{name}.lora_A.weight"] = torch.randn((rank, sub.in_features), generator=gen) * std
            sd[f"{name}.lora_B.weight"] = torch.randn((sub.out_features, rank), generator=gen) * std
        layers[comp] = sd
    if shared_down:
        sd = layers["transformer"]
        fused_layers = (
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        )
        for fused in fused_layers:
            for key in [k for k in sd if k.endswith(f".{fused[0]}.lora_A.weight")]:
                block = key[: -len(f"{fused[0]}.lora_A.weight")]
                for other in fused[1:]:
                    if f"{block}{other}.lora_A.weight" in sd:
                        sd[f"{block}{other}.lora_A.weight"] = sd[key].clone()
    return layers


def save_dit_diffusers_lora(pipe, layers, path, rank: int, alpha: float | None = None) -> Path:
    """Write ``layers`` with the pipeline class's own ``save_lora_weights`` (the reference writer)."""
    from lora_composer.tiny import save_diffusers_lora

    return save_diffusers_lora(pipe, layers, path, rank=rank, alpha=alpha)


# diffusers module (relative to a double block) -> BFL layer in kohya names; fused layers list their parts
_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}


def _fuse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (down, up) for outputs stacked in order: the shared down when every part has the same one (what
    sd-scripts trains), else the downs stacked and the ups block-diagonal (exact for separate LoRAs)."""
    downs, ups = [d for d, _ in parts], [u for _, u in parts]
    if all(torch.equal(d, downs[0]) for d in downs):
        return downs[0], torch.cat(ups, dim=0)
    return torch.cat(downs, dim=0), torch.block_diag(*ups)


def save_flux_kohya_lora(layers, path, rank: int, alpha: float | None = None) -> Path:
    """Write FLUX ``layers`` (as :func:`random_dit_lora_layers` makes them) in kohya sd-scripts keys:
    ``lora_unet_double_blocks_N_img_attn_qkv``, ``lora_unet_single_blocks_N_linear1`` (BFL's fused layers),
    ``lora_unet_final_layer_*``, ``lora_te1_text_model_...`` (CLIP), ``lora_te2_encoder_block_...`` (T5), each
    with its alpha. Other transformer layers (embedders) are left out."""
    from safetensors.torch import save_file

    alpha = float(rank if alpha is None else alpha)
    factors = {}  # canonical module -> (down, up)
    for comp, sd in layers.items():
        for k, v in sd.items():
            module, _, which = k.rpartition(".lora_")
            factors.setdefault(f"{comp}.{module}", [None, None])["B" in which] = v
    out: dict[str, torch.Tensor] = {}

    def put(name, down, up):
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down.contiguous(), up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha * down.shape[0] / rank)  # every part keeps alpha / rank

    blocks = {
        (kind, int(key.split(".")[2]))
        for key in factors
        if key.startswith("transformer.")
        for kind in ("transformer_blocks", "single_transformer_blocks")
        if key.split(".")[1] == kind
    }
    for kind, i in sorted(blocks):
        table, bfl = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        for name, modules in table.items():
            parts = [factors.pop(f"transformer.{kind}.{i}.{m}", None) for m in modules]
            if any(p is None for p in parts):
                continue
            put(f"lora_unet_{bfl}_{i}_{name}", *_fuse(parts))
    for module, name in (("proj_out", "final_layer_linear"), ("norm_out.linear", "final_layer_adaLN_modulation_1")):
        if f"transformer.{module}" in factors:
            down, up = factors.pop(f"transformer.{module}")
            if module == "norm_out.linear":  # diffusers' (scale, shift) halves -> BFL's (shift, scale)
                scale, shift = up.chunk(2, dim=0)
                up = torch.cat([shift, scale], dim=0)
            put(f"lora_unet_{name}", down, up)
    for key in [k for k in factors if k.startswith(("text_encoder.", "text_encoder_2."))]:
        comp, rel = key.split(".", 1)
        name = ("lora_te1_text_model_" if comp == "text_encoder" else "lora_te2_") + rel.replace(".", "_")
        put(name, *factors.pop(key))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path


_XLABS = {
    "transformer_blocks": {
        "qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "proj_lora1": ("attn.to_out.0",),
        "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "proj_lora2": ("attn.to_add_out",),
    },
    "single_transformer_blocks": {"qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v")},
}


def save_flux_xlabs_lora(layers, path) -> Path:
    """Write the attention layers of FLUX ``layers`` (made with ``shared_down=True``: XLabs trains fused q, k, v)
    in XLabs' keys, ``double_blocks.N.processor.qkv_lora1.down.weight``... (no alphas: scale 1)."""
    from safetensors.torch import save_file

    sd, out = layers["transformer"], {}
    for kind, table in _XLABS.items():
        bfl = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith(kind + ".")})
        for i in blocks:
            for name, modules in table.items():
                downs = [sd[f"{kind}.{i}.{m}.lora_A.weight"] for m in modules]
                if not all(torch.equal(d, downs[0]) for d in downs):
                    raise ValueError(f"{kind}.{i}: XLabs fuses {', '.join(modules)} with one down weight")
                out[f"{bfl}.{i}.processor.{name}.down.weight"] = downs[0].contiguous()
                out[f"{bfl}.{i}.processor.{name}.up.weight"] = torch.cat(
                    [sd[f"{kind}.{i}.{m}.lora_B.weight"] for m in modules]
                ).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path
