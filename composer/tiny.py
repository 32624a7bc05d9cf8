"""Tiny SD1.5- and SDXL-shaped pipelines and random LoRAs, built offline from configs.

They serve the tests and the default local model (until a trained default model ships). The
tokenizer is the real CLIP BPE, rebuilt from the vocabulary that open_clip bundles, so prompts
tokenize exactly as with ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

import torch

SD15_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
CONV_TARGETS = ("conv1", "conv2")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table used by the BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _clip_tokenizer_dir() -> str:
    """Write CLIP's ``vocab.json``/``merges.txt`` from open_clip's bundled BPE file (once per process)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open-clip-torch is needed to build the CLIP tokenizer offline")
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out = Path(tempfile.mkdtemp(prefix="lora-composer-tok-"))
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return str(out)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    # vocab_file=/merges_file= keyword arguments are silently ignored by some versions: load the folder.
    return CLIPTokenizer.from_pretrained(_clip_tokenizer_dir(), model_max_length=77, pad_token="<|endoftext|>")


def _text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
        projection_dim=32,
        **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )


def build_tiny_sd15_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with SD1.5's structure at toy size (random weights, 64x64 output)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline with SDXL's structure (two text encoders, text_time embedding) at toy size."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _targets(module: torch.nn.Module, suffixes, conv_suffixes=()):
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and any(name.endswith("." + s) for s in suffixes):
            yield name, sub
        elif isinstance(sub, torch.nn.Conv2d) and any(name.endswith("." + s) for s in conv_suffixes):
            yield name, sub


def random_lora_layers(
    pipe,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.1,
    text_encoder: bool = True,
    conv: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT-format LoRA layers per component (``{"unet": {"down_blocks...to_q.lora_A.weight": ...}}``).

    Both factors are random (PEFT initialises ``lora_B`` to zero, which would hide every bug).
    ``conv=True`` adds LoCon deltas on the ResNet convolutions.
    """
    gen = torch.Generator().manual_seed(seed)
    components = {"unet": (pipe.unet, SD15_TARGETS, CONV_TARGETS if conv else ())}
    if text_encoder:
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                components[name] = (getattr(pipe, name), TEXT_TARGETS, ())
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for comp, (module, suffixes, conv_suffixes) in components.items():
        sd = {}
        for name, sub in _targets(module, suffixes, conv_suffixes):
            if isinstance(sub, torch.nn.Conv2d):
                a_shape = (rank, sub.in_channels, *sub.kernel_size)
                b_shape = (sub.out_channels, rank, 1, 1)
            else:
                a_shape, b_shape = (rank, sub.in_features), (sub.out_features, rank)
            sd[f"{name}.lora_A.weight"] = torch.randn(a_shape, generator=gen) * std
            sd[f"{name}.lora_B.weight"] = torch.randn(b_shape, generator=gen) * std
        layers[comp] = sd
    return layers


def _lora_config(layers: dict[str, torch.Tensor], rank: int, alpha: float) -> dict:
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in layers})
    return {"r": rank, "lora_alpha": alpha, "target_modules": targets}


def save_diffusers_lora(pipe, layers, path, rank: int, alpha: float | None = None) -> Path:
    """Write ``layers`` with diffusers' own ``save_lora_weights`` (the reference writer)."""
    alpha = rank if alpha is None else alpha
    path = Path(path)
    kwargs = {}
    for comp, sd in layers.items():
        kwargs[f"{comp}_lora_layers"] = sd
        kwargs[f"{comp}_lora_adapter_metadata"] = _lora_config(sd, rank, alpha)
    type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, safe_serialization=True, **kwargs)
    return path


def save_kohya_lora(layers, path, alpha: float | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write ``layers`` in Kohya/A1111 key format (``lora_unet_*``, ``lora_te1_*``...) with alphas."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    prefixed = {f"{comp}.{k}": v for comp, sd in layers.items() for k, v in sd.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    if alpha is not None:
        kohya = {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    # Real files name CLIP modules with transformers 4's ``text_model.`` level; SD1.5 files say lora_te_,
    # SDXL ones lora_te1_/lora_te2_.
    sdxl = any(k.startswith("lora_te2") for k in kohya)
    renamed = {}
    for k, v in kohya.items():
        for te in ("lora_te1_", "lora_te2_"):
            if k.startswith(te) and not k.startswith(te + "text_model"):
                k = te + "text_model_" + k[len(te) :]
        if not sdxl and k.startswith("lora_te1_"):
            k = "lora_te_" + k[len("lora_te1_") :]
        renamed[k] = v
    kohya = renamed
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path), metadata=metadata or {})
    return path
