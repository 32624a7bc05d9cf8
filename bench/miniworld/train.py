"""Train the mini world's text-to-image model from scratch, then its concept LoRAs.

    python -m bench.miniworld.train vae   --out DIR      # AutoencoderKL on base-world images
    python -m bench.miniworld.train base  --out DIR      # CLIP text encoder + UNet, jointly, on base captions
                                                         # (then a refinement stage at a lower learning rate)
    python -m bench.miniworld.train loras --out DIR      # one LoRA per new concept (PEFT), into DIR/loras
    python -m bench.miniworld.train previews --out DIR   # preview images of some LoRAs (done by loras too)
    python -m bench.miniworld.train all   --out DIR      # all of the above in order

``DIR/model`` is a ``StableDiffusionPipeline`` folder (diffusers format). Everything is seeded; on this
project's 2-core CPU the default recipe takes the times recorded in ``docs/EVAL.md``. A GPU is used when
present (``--device``), the CPU recipe is the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_composer.miniworld import world
from lora_composer.miniworld.detectors import to_tensor

TEXT_HIDDEN = 48
# Attention and feed-forward projections plus the ResNet convolutions (LoCon): a new shape or pattern is
# spatial, and the attention layers only sit at the two coarsest resolutions.
LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- components
def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=world.SIZE,
        layers_per_block=1,
        block_out_channels=[16, 32, 32],
        norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
    )


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_act="quick_gelu",
            projection_dim=TEXT_HIDDEN,
        )
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        norm_num_groups=16,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def _cosine_lr(opt, step: int, total: int, base: float, warmup: int = 100) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    for g in opt.param_groups:
        g["lr"] = max(lr, base * 0.02)


def _optimize(opt, objective: torch.Tensor, bar, clip: list | None = None, **postfix: float) -> None:
    """One optimizer step on ``objective`` (gradients clipped to norm 1 over ``clip``), shown on the progress bar."""
    opt.zero_grad(set_to_none=True)
    objective.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    bar.update()
    bar.set_postfix({k: f"{v:.4f}" for k, v in postfix.items()})


# --------------------------------------------------------------------------------------------------- VAE
def train_vae(out: Path, steps: int = 1500, batch: int = 16, lr: float = 1e-3, seed: int = 0, device: str = "cpu"):
    """Reconstruction + a small KL term; sets ``scaling_factor`` to 1 / latent std.

    The autoencoder is the image codec, like SD's VAE trained on broad imagery: it sees every colour, shape and
    pattern of the world (a codec trained on base pictures only turns purple into yellow). The concepts stay
    new to the *model*: the text encoder and the UNet, which the LoRAs adapt, never see them.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    everything = {c.name: c.values for c in world.CATEGORIES}
    vae = build_vae().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = _progress(steps, "vae")
    for step in range(steps):
        _cosine_lr(opt, step, steps, lr)
        x = to_tensor(world.sample(rng, batch, everything)[0]).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        mse = F.mse_loss(rec, x)
        _optimize(opt, mse + 1e-4 * kl, bar, mse=mse.item())
    bar.close()
    vae.eval()
    with torch.no_grad():
        x = to_tensor(world.sample(rng, 256, everything)[0]).to(device)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.to("cpu").save_pretrained(out / "vae", safe_serialization=True)
    return vae


@torch.no_grad()
def encode(vae, images: np.ndarray, device: str = "cpu", batch: int = 256) -> torch.Tensor:
    """Scaled latent means of ``images`` (the denoiser's training targets)."""
    out = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch]).to(device)
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------- denoiser loop
def _tokenize(tokenizer, captions: list[str], device: str) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def _diffusion_loss(unet, text_encoder, sched, latents, ids, gen: torch.Generator) -> torch.Tensor:
    """Epsilon loss with min-SNR(5) weighting (Hang et al. 2023: faster convergence for small budgets)."""
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(latents.device)
    noisy = sched.add_noise(latents, noise, t)
    cond = text_encoder(ids).last_hidden_state
    pred = unet(noisy, t, cond).sample
    abar = sched.alphas_cumprod.to(latents.device)[t]
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=5.0) / snr
    return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()


def _scenes_captions(scenes, rng, drop, keep=None, uncond: float = 0.1, caption=world.caption) -> list[str]:
    """Captions with phrase dropout, and the empty caption for ``uncond`` of them (classifier-free guidance)."""
    return ["" if rng.random() < uncond else caption(s, rng, drop, keep) for s in scenes]


def train_base(
    out: Path,
    steps: int = 4000,
    batch: int = 32,
    lr: float = 1e-3,
    images: int = 20000,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = False,
):
    """Text encoder and UNet from scratch on base-world images (no LoRA concept is ever shown).

    ``resume``: continue from ``out/model`` (more steps on a model already trained) instead of from scratch.
    """
    from diffusers import AutoencoderKL

    from lora_composer.tiny import clip_tokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae").to(device).eval()
    pics, _, scenes = world.sample(rng, images)
    latents = encode(vae, pics, device)
    del pics
    if resume:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(out / "model" / "text_encoder").to(device)
        unet = UNet2DConditionModel.from_pretrained(out / "model" / "unet").to(device)
    else:
        text_encoder, unet = build_text_encoder().to(device), build_unet().to(device)
    tokenizer, sched = clip_tokenizer(), noise_scheduler()
    text_encoder.train()
    unet.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    bar = _progress(steps, "base")
    for step in range(steps):
        _cosine_lr(opt, step, steps, lr)
        idx = rng.integers(0, len(scenes), batch)
        ids = _tokenize(tokenizer, _scenes_captions([scenes[i] for i in idx], rng, drop=0.25), device)
        loss = _diffusion_loss(unet, text_encoder, sched, latents[torch.from_numpy(idx).to(device)], ids, gen)
        _optimize(opt, loss, bar, clip=params, loss=loss.item())
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
    bar.close()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    save_pipeline(out, vae.to("cpu"), text_encoder.to("cpu"), unet.to("cpu"), tokenizer)


def save_pipeline(out: Path, vae, text_encoder, unet, tokenizer) -> Path:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler().config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "model", safe_serialization=True)
    from lora_composer.miniworld.assets import DEFAULT_GUIDANCE, MODEL_NAME
    from lora_composer.vocab import MODEL_DEFAULTS_FILE

    defaults = {"name": MODEL_NAME, "guidance_scale": DEFAULT_GUIDANCE}
    (out / "model" / MODEL_DEFAULTS_FILE).write_text(json.dumps(defaults) + "\n")
    return out / "model"


# ------------------------------------------------------------------------------------------------ LoRAs
def train_lora(
    model_dir: Path,
    category: str,
    value: str,
    steps: int = 500,
    batch: int = 32,
    rank: int = 8,
    lr: float = 1e-3,
    images: int = 2000,
    seed: int = 0,
    device: str = "cpu",
    text_encoder_lora: bool = True,
    uncond: float = 0.1,
    w=world,
    allowed: dict | None = None,
    drop: float = 0.25,
) -> dict[str, dict]:
    """A PEFT LoRA (UNet and text-encoder attention) teaching ``value`` of ``category`` to the base model.

    ``uncond`` of the captions are empty, as in the base model's training: the LoRA acts on the
    unconditional pass of classifier-free guidance too, and must keep it sound there. ``w``: the world drawing
    the pictures and captions (a module with ``sample`` and ``caption``), ``allowed`` its sampling rule
    (default: the concept in its category, base values elsewhere), ``drop`` the phrase dropout.
    Returns PEFT-format layers per component (``{"unet": {...lora_A.weight: ...}, "text_encoder": {...}}``).
    """
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir).to(device)
    pics, _, scenes = w.sample(rng, images, allowed or world.concept_allowed(category, value))
    latents = encode(pipe.vae, pics, device)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    if text_encoder_lora:  # PEFT directly: transformers' add_adapter wants a newer PEFT than diffusers does
        text_encoder = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_LORA_TARGETS, init_lora_weights="gaussian"),
            text_encoder,
        )
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = noise_scheduler()
    bar = _progress(steps, f"lora {value}")
    for step in range(steps):
        _cosine_lr(opt, step, steps, lr, warmup=20)
        idx = rng.integers(0, len(scenes), batch)
        caps = _scenes_captions([scenes[i] for i in idx], rng, drop, category, uncond, caption=w.caption)
        ids = _tokenize(pipe.tokenizer, caps, device)
        loss = _diffusion_loss(unet, text_encoder, sched, latents[torch.from_numpy(idx).to(device)], ids, gen)
        _optimize(opt, loss, bar, loss=loss.item())
    bar.close()
    layers = {"unet": {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}}
    if text_encoder_lora:
        layers["text_encoder"] = {
            k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(text_encoder).items()
        }
    return layers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.miniworld.train", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["vae", "base", "loras", "previews", "all"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--base-steps", type=int, default=4500)
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument(
        "--refine-steps",
        type=int,
        default=3000,
        help="base, second stage: more steps from the trained model, fresh optimizer and EMA (0: none)",
    )
    p.add_argument("--refine-lr", type=float, default=3e-4)
    p.add_argument("--resume", action="store_true", help="with base: only the refinement stage, on DIR/model")
    p.add_argument("--lora-steps", type=int, default=None, help="steps per LoRA (default: each LoRA's own)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--only", nargs="*", help="with loras: only these concept values")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "train-log.json"

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        times = json.loads(log.read_text()) if log.exists() else {}  # re-read: runs for other LoRAs may write too
        times[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "device": args.device,
            "threads": torch.get_num_threads(),
        }
        log.write_text(json.dumps(times, indent=2) + "\n")

    needs = {"base": "model" if args.resume else "vae", "loras": "model", "previews": "model"}.get(args.what)
    if needs and not (args.out / needs).is_dir():
        p.error(
            f"{args.out / needs} does not exist: train '{needs if needs == 'vae' else 'base'}' into {args.out} first"
        )
    if args.what in ("vae", "all"):
        timed("vae", lambda: train_vae(args.out, steps=args.vae_steps, device=args.device))
    if args.what in ("base", "all"):
        if not args.resume:
            timed("base", lambda: train_base(args.out, steps=args.base_steps, lr=args.base_lr, device=args.device))
        if args.refine_steps:
            timed(
                "base, refined",
                lambda: train_base(
                    args.out, steps=args.refine_steps, lr=args.refine_lr, device=args.device, resume=True
                ),
            )
    if args.what in ("loras", "all"):
        from bench.miniworld import lora_files
        from lora_composer.miniworld import library

        for i, spec in enumerate(library.LORAS):
            if args.only and spec.value not in args.only:
                continue
            # Each LoRA its own seed: its own initial factors and pictures, as independently trained files have.
            timed(
                f"lora {spec.name}",
                lambda spec=spec, i=i: lora_files.write_lora(
                    args.out / "model",
                    args.out / "loras",
                    spec,
                    train_lora(
                        args.out / "model",
                        spec.category,
                        spec.value,
                        steps=args.lora_steps or spec.steps,
                        seed=1 + i,
                        device=args.device,
                    ),
                ),
            )
    if args.what in ("loras", "previews", "all"):
        from bench.miniworld import lora_files

        for path in lora_files.write_previews(args.out / "model", args.out / "loras"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
