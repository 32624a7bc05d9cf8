"""Fine-tune the two-object world's base model for a fixed time budget.

The shipped UNet (and optionally the text encoder's layers) trains on two-object and one-object pictures of
base concepts.

    python -m bench.miniworld.train_two_objects --threads 1 --text-layers --lr 1e-3   # the shipped base

Writes ``unet/`` (fp16), with ``--text-layers`` the text encoder's layers, and ``train.json`` (the run's
figures) into ``--out`` (default: the shipped folder, :func:`lora_composer.miniworld.two_objects.weights_dir`).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from lora_composer.miniworld import assets, two_objects, world
from lora_composer.miniworld.text_layers import TEXT_LAYERS, TOKEN_EMBEDDING, apply_text_layers, text_layers_file


def train(
    out: Path,
    seconds: float = 1200.0,
    max_steps: int = 100000,
    batch2: int = 16,
    batch1: int = 8,
    lr: float = 3e-4,
    pictures: int = 4000,
    seed: int = 0,
    text_layers: bool = False,
    resume: Path | None = None,
) -> dict:
    """Fine-tune the shipped UNet on two-object (128x64) and one-object (64x64) pictures of base concepts.

    The text encoder stays frozen (the LoRAs' text layers keep the inputs they were trained on, and nothing
    of it needs shipping), or with ``text_layers`` all of it but the 9.5 MB token embedding trains too (shipped
    as a small fp16 file); each step is one two-object and one one-object batch. Stops after ``seconds``
    of training (``max_steps`` at most): the budget, not a step count, is what the recipe fixes.
    """
    from diffusers import StableDiffusionPipeline

    from bench.miniworld import train as tr

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 7)
    gen = torch.Generator().manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(
        assets.model_dir(), safety_checker=None, requires_safety_checker=False
    )
    shipped_text = copy.deepcopy(pipe.text_encoder)  # the embedding rows ship as changes against this one
    if resume is not None:  # continue a two-object fine-tune (its UNet and text layers)
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(resume / "unet", torch_dtype=torch.float32)
        apply_text_layers(pipe.text_encoder, resume / TEXT_LAYERS)
    vae, text_encoder, unet, tokenizer = pipe.vae.eval(), pipe.text_encoder.eval(), pipe.unet.train(), pipe.tokenizer
    text_encoder.requires_grad_(False)
    if text_layers:
        for name, p in text_encoder.named_parameters():
            p.requires_grad_(not name.endswith(TOKEN_EMBEDDING))
    t0 = time.perf_counter()
    two_pics, _, pairs = two_objects.sample(rng, pictures)
    one_pics, _, scenes = world.sample(rng, pictures // 2)
    lat2, lat1 = tr.encode(vae, two_pics, batch=64), tr.encode(vae, one_pics, batch=128)
    del two_pics, one_pics
    prep = time.perf_counter() - t0
    params = list(unet.parameters()) + [p for p in text_encoder.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = tr.noise_scheduler()
    t0, step, losses = time.perf_counter(), 0, []
    expected = max_steps
    while step < max_steps and time.perf_counter() - t0 < seconds:
        tr._cosine_lr(opt, step, expected, lr, warmup=50)
        i2, i1 = rng.integers(0, len(pairs), batch2), rng.integers(0, len(scenes), batch1)
        cap2 = ["" if rng.random() < 0.1 else two_objects.caption(pairs[i], rng, 0.2) for i in i2]
        cap1 = tr._scenes_captions([scenes[i] for i in i1], rng, drop=0.25)
        l2 = tr._diffusion_loss(
            unet, text_encoder, sched, lat2[torch.from_numpy(i2)], tr._tokenize(tokenizer, cap2, "cpu"), gen
        )
        l1 = tr._diffusion_loss(
            unet, text_encoder, sched, lat1[torch.from_numpy(i1)], tr._tokenize(tokenizer, cap1, "cpu"), gen
        )
        loss = (batch2 * l2 + batch1 * l1) / (batch2 + batch1)
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
    out.mkdir(parents=True, exist_ok=True)
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    if text_layers:
        from safetensors.torch import save_file

        save_file(text_layers_file(text_encoder, shipped_text), str(out / TEXT_LAYERS))
    figures = {
        "steps": step,
        "batch": f"{batch2} two-object (128x64) + {batch1} one-object (64x64)",
        "lr": lr,
        "pictures": f"{pictures} two-object + {pictures // 2} one-object, base concepts only",
        "seconds_training": round(took, 1),
        "seconds_drawing_and_encoding": round(prep, 1),
        "threads": torch.get_num_threads(),
        "text_encoder": "layers fine-tuned, token embedding shipped" if text_layers else "frozen (shipped)",
        "unet_file": "fp16",
        "final_loss_100": round(float(np.mean(losses[-100:])), 4),
    }
    (out / "train.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.miniworld.train_two_objects", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="the weights folder (default: the shipped one)")
    p.add_argument("--seconds", type=float, default=1150.0, help="training time budget")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch2", type=int, default=12)
    p.add_argument("--batch1", type=int, default=6)
    p.add_argument("--pictures", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--text-layers", action="store_true", help="fine-tune the text encoder but its token embedding")
    p.add_argument("--resume", type=Path, default=None, help="continue from this two-object weights folder")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = train(
        args.out or two_objects.weights_dir(),
        seconds=args.seconds,
        batch2=args.batch2,
        batch1=args.batch1,
        lr=args.lr,
        pictures=args.pictures,
        seed=args.seed,
        text_layers=args.text_layers,
        resume=args.resume,
    )
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
