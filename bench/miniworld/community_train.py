"""Train the community world: its base model (fine-tuned from the shipped one) and its five variant LoRAs.

    python -m bench.miniworld.community_train base  --out build/community --threads 1 --seconds 1000
    python -m bench.miniworld.community_train loras --out build/community --threads 1
    python -m bench.miniworld.community_train ship  --out build/community   # into weights/community
    python -m bench.miniworld.community_train unship --out build/community  # DIR/model from weights/community

``unship`` rebuilds ``DIR/model`` from what ships, so a further ``base --resume`` stage (or new LoRAs) starts
from the shipped community model on a fresh clone.

The shipped model's VAE, tokenizer and text-encoder structure serve as they are (the VAE saw stars, purple,
outlines and checkerboards); the UNet and the text encoder are fine-tuned on pictures of every *base* value of
:mod:`~lora_composer.miniworld.community` (no variant and no trigger word is ever shown), for a fixed time
budget. ``build/community/model`` is a whole diffusers folder (the LoRAs train on it); what ships is the UNet
in fp16 and the text encoder's layers plus the embedding rows that moved (as the two-object world does).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.miniworld import train as tr
from bench.miniworld.lora_files import write_community_lora
from lora_composer.miniworld import assets, community
from lora_composer.miniworld.community_library import LORAS, library_dir
from lora_composer.miniworld.text_layers import TEXT_LAYERS, text_layers_file

LORA_STEPS = 400  # per LoRA (loras --steps overrides)


def train_base(
    out: Path,
    seconds: float = 1000.0,
    batch: int = 32,
    lr: float = 5e-4,
    pictures: int = 16000,
    seed: int = 0,
    max_steps: int = 100000,
    resume: bool = False,
) -> dict:
    """Fine-tune the shipped UNet and text encoder on community base pictures for ``seconds`` of training
    (``resume``: continue from ``out/model``, a fresh optimizer and EMA)."""
    from diffusers import StableDiffusionPipeline

    seed += 1000 if resume else 0  # other pictures and noise for a second stage
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 11)
    gen = torch.Generator().manual_seed(seed)
    init = out / "model" if resume else assets.model_dir()
    pipe = StableDiffusionPipeline.from_pretrained(init, safety_checker=None, requires_safety_checker=False)
    vae, text_encoder, unet, tokenizer = pipe.vae.eval(), pipe.text_encoder.train(), pipe.unet.train(), pipe.tokenizer
    t0 = time.perf_counter()
    pics, _, scenes = community.sample(rng, pictures)
    latents = tr.encode(vae, pics, batch=128)
    del pics
    prep = time.perf_counter() - t0
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = tr.noise_scheduler()
    t0, step, losses, expected = time.perf_counter(), 0, [], max_steps
    while step < max_steps and time.perf_counter() - t0 < seconds:
        tr._cosine_lr(opt, step, expected, lr, warmup=50)
        idx = rng.integers(0, len(scenes), batch)
        caps = ["" if rng.random() < 0.1 else community.caption(scenes[i], rng, 0.25) for i in idx]
        loss = tr._diffusion_loss(
            unet, text_encoder, sched, latents[torch.from_numpy(idx)], tr._tokenize(tokenizer, caps, "cpu"), gen
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(0.998, (1 + step) / (10 + step)))
        losses.append(loss.item())
        step += 1
        if step == 50:  # the cosine schedule's length, from the measured speed and the budget
            expected = min(max_steps, int(seconds / ((time.perf_counter() - t0) / step)))
        if step % 100 == 0:
            print(
                f"step {step}/{expected} loss {np.mean(losses[-100:]):.4f} {time.perf_counter() - t0:.0f}s", flush=True
            )
    took = time.perf_counter() - t0
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    tr.save_pipeline(out, vae, text_encoder, unet, tokenizer)
    figures = {
        "steps": step,
        "batch": batch,
        "lr": lr,
        "pictures": f"{pictures} community base pictures",
        "init": "the previous stage" if resume else "the shipped one-object model",
        "seconds_training": round(took, 1),
        "seconds_drawing_and_encoding": round(prep, 1),
        "threads": torch.get_num_threads(),
        "final_loss_100": round(float(np.mean(losses[-100:])), 4),
    }
    log = out / "base-train.json"
    stages = json.loads(log.read_text()) if resume and log.exists() else {}
    stages[f"stage {len(stages) + 1}"] = figures  # a stage-1 file written by this function holds {"stage 1": ...}
    log.write_text(json.dumps(stages, indent=2) + "\n")
    return figures


def ship(out: Path, dest: Path) -> list[Path]:
    """Copy what the community world needs beyond the shipped model into ``dest``: UNet (fp16), text layers."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    dest.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(out / "model" / "unet")
    unet.to(torch.float16).save_pretrained(dest / "unet", safe_serialization=True)
    trained = CLIPTextModel.from_pretrained(out / "model" / "text_encoder")
    shipped = CLIPTextModel.from_pretrained(assets.model_dir() / "text_encoder")
    save_file(text_layers_file(trained, shipped), str(dest / TEXT_LAYERS))
    written = [dest / "unet", dest / TEXT_LAYERS]
    for name in ("base-train.json", "loras-train.json"):
        if (out / name).is_file():
            shutil.copy(out / name, dest / name)
            written.append(dest / name)
    return written


def unship(out: Path) -> Path:
    """``out/model``: the shipped model with the community UNet and text layers in place (a whole diffusers
    folder, fp32), with the shipped training logs beside it."""
    from lora_composer.miniworld import community_eval

    pipe = community_eval.load_pipeline().pipe
    written = tr.save_pipeline(out, pipe.vae, pipe.text_encoder, pipe.unet, pipe.tokenizer)
    for name in ("base-train.json", "loras-train.json"):
        if (community_eval.weights_dir() / name).is_file():
            shutil.copy(community_eval.weights_dir() / name, out / name)
    return written


def train_all(out: Path, steps: int | None = None, only=None, library: Path | None = None) -> list[Path]:
    """Train every LoRA (or ``only`` these variants) on ``out/model``, write them to ``library`` (default: the
    shipped folder), record each one's time in ``out/loras-train.json``."""
    library = library or library_dir()
    log = out / "loras-train.json"
    written = []
    for i, spec in enumerate(LORAS):
        if only and spec.value not in only:
            continue
        t0 = time.perf_counter()
        layers = tr.train_lora(
            out / "model",
            spec.category,
            spec.value,
            steps=steps or LORA_STEPS,
            seed=101 + i,
            w=community,
            allowed=community.variant_allowed(spec.category, spec.value),
            drop=0.0,
        )
        seconds = time.perf_counter() - t0
        written.append(write_community_lora(out / "model", library, spec, layers))
        times = json.loads(log.read_text()) if log.exists() else {}  # re-read: parallel runs write too
        times[spec.name] = {
            "seconds": round(seconds, 1),
            "steps": steps or LORA_STEPS,
            "batch": 32,
            "threads": torch.get_num_threads(),
        }
        log.write_text(json.dumps(times, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.miniworld.community_train", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["base", "loras", "ship", "unship"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seconds", type=float, default=1000.0, help="base: training time budget")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--resume", action="store_true", help="base: a further stage from DIR/model")
    p.add_argument("--steps", type=int, default=None, help="loras: steps per LoRA (default: each one's own)")
    p.add_argument("--only", nargs="*", help="loras: only these variants")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "base":
        print(json.dumps(train_base(args.out, seconds=args.seconds, lr=args.lr, resume=args.resume), indent=2))
    elif args.what == "loras":
        for path in train_all(args.out, steps=args.steps, only=args.only):
            print(f"wrote {path}")
    elif args.what == "unship":
        print(f"wrote {unship(args.out)}")
    else:
        for path in ship(args.out, assets.WEIGHTS / "community"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
