"""Train a mini-world detector on fresh pictures of every value, degraded as generated pictures are.

Every value, base and LoRA, is drawn; pictures are degraded the way a diffusion model's output is (blur,
noise, colour drift, smoothing) so that imperfect generations are still read by what they show, not by how
clean they are.

    python -m bench.miniworld.train_detectors --out detectors.safetensors [--steps N] [--threads 1]
    python -m bench.miniworld.train_detectors --world community --codec --out weights/community/detectors.safetensors

The network, its file format and its loading: :mod:`lora_composer.miniworld.detectors`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_composer.miniworld import world
from lora_composer.miniworld.detectors import Detector, save_detector, to_tensor

DEFAULT_STEPS = 1200
DEFAULT_BATCH = 64
ALL_VALUES = {c.name: c.values for c in world.CATEGORIES}
_TRAIN_STREAM, _EVAL_STREAM = 0, 1  # numpy seed-sequence keys: training and evaluation never share images


def _targets(scenes: list, categories=world.CATEGORIES) -> dict[str, torch.Tensor]:
    return {c.name: torch.tensor([c.values.index(getattr(s, c.name)) for s in scenes]) for c in categories}


def draw(rng: np.random.Generator, n: int, w=world) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` fresh pictures of world ``w``, every value of every category equally likely, and their labels."""
    images, _, scenes = w.sample(rng, n, {c.name: c.values for c in w.CATEGORIES})
    return to_tensor(images), _targets(scenes, w.CATEGORIES)


@torch.no_grad()
def through_codec(vae, x: torch.Tensor) -> torch.Tensor:
    """``x`` encoded and decoded by the model's VAE: the codec's own losses (thin lines, large tiles), which
    every generated picture carries, shown to the detector with the true labels."""
    return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)


# ------------------------------------------------------------------------------------------ augmentation
def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with one sigma per image (0 leaves it as is): a VAE decoder's softness."""
    n, c, h, w = x.shape
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(-1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, 5)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def _smooth(x: torch.Tensor, size: int) -> torch.Tensor:
    """Down- and upsampling: the lost detail of a lossy codec or a low-resolution latent."""
    small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def augment(x: torch.Tensor, gen: torch.Generator, p: float = 0.8) -> torch.Tensor:
    """Degrade a fraction ``p`` of the batch as generated images are degraded; labels stay the ground truth."""
    n = len(x)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    on = (torch.rand(n, generator=gen) < p).float().view(n, 1, 1, 1)
    y = _blur(x, uniform(0.0, 1.0) * (torch.rand(n, generator=gen) < 0.6))
    smooth = (torch.rand(n, generator=gen) < 0.3).view(n, 1, 1, 1)
    y = torch.where(smooth, _smooth(y, int(torch.randint(28, 49, (1,), generator=gen))), y)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * uniform(0.85, 1.15, 1, 1, 1) + mean + uniform(-0.1, 0.1, 1, 1, 1) + uniform(-0.06, 0.06, 3, 1, 1)
    y = y + torch.randn(y.shape, generator=gen) * uniform(0.0, 0.1, 1, 1, 1)
    return (on * y + (1 - on) * x).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------- training
def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(logits[name], targets[name]) for name in logits)


def _lr(step: int, total: int, base: float) -> float:
    """Linear warm-up (a tenth of the run, at most 50 steps), then cosine decay to zero."""
    warmup = min(50, total // 10)
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_detector(
    steps: int = DEFAULT_STEPS,
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
    lr: float = 3e-3,
    progress: bool = True,
    w=None,
    codec=None,
    pool: int = 4096,
) -> Detector:
    """A detector trained on ``steps`` batches of fresh, augmented pictures of every value of world ``w``
    (default: the one-object world); with ``codec`` (a VAE) half of each batch is drawn from a pool of
    ``pool`` pictures that went through it once (a round trip per step would cost more than the training)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, _TRAIN_STREAM])
    gen = torch.Generator().manual_seed(seed)
    detector = Detector(categories=(w or world).CATEGORIES)
    if codec is not None:
        px, ptargets = draw(rng, pool) if w is None else draw(rng, pool, w)
        px = torch.cat([through_codec(codec, px[i : i + 128]) for i in range(0, pool, 128)])
    opt = torch.optim.AdamW(detector.parameters(), lr=lr, weight_decay=1e-4)
    detector.train()
    bar = tqdm(range(steps), desc="detector", unit="step", dynamic_ncols=True, disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x, targets = draw(rng, batch) if w is None else draw(rng, batch, w)
        if codec is not None:
            pick = torch.from_numpy(rng.integers(0, pool, batch // 2))
            x = torch.cat([px[pick], x[batch // 2 :]])
            targets = {k: torch.cat([ptargets[k][pick], v[batch // 2 :]]) for k, v in targets.items()}
        loss = _loss(detector(augment(x, gen)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return detector.eval()


def accuracy(
    detector: Detector, n: int = 2000, seed: int = 0, degrade: bool = False, w=None, codec=None
) -> dict[str, float]:
    """Per-category accuracy on ``n`` fresh pictures of every value (a stream no training run draws from);
    ``degrade`` applies the training augmentation to all of them first, ``codec`` (a VAE) its round trip."""
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    x, targets = draw(rng, n) if w is None else draw(rng, n, w)
    if codec is not None:
        x = torch.cat([through_codec(codec, x[i : i + 256]) for i in range(0, len(x), 256)])
    if degrade:
        x = augment(x, torch.Generator().manual_seed(seed), p=1.0)
    probs = detector.probs(x)
    return {name: (probs[name].argmax(-1) == targets[name]).float().mean().item() for name in probs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.miniworld.train_detectors", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="detector file to write (.safetensors)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=2000, help="fresh pictures the accuracy is measured on")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--world", choices=("one-object", "community"), default="one-object")
    p.add_argument(
        "--codec",
        action="store_true",
        help="half of each batch through the model's VAE first (and accuracy reported on its round trip too)",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.eval_images < 1:
        p.error("--steps, --batch and --eval-images must be positive")
    torch.set_num_threads(args.threads)

    w, codec = None, None
    if args.world == "community":
        from lora_composer.miniworld import community as w
    if args.codec:
        from diffusers import AutoencoderKL

        from lora_composer.miniworld import assets

        codec = AutoencoderKL.from_pretrained(assets.model_dir() / "vae").eval()
    start = time.perf_counter()
    detector = train_detector(args.steps, args.batch, args.seed, w=w, codec=codec)
    seconds = time.perf_counter() - start
    acc = accuracy(detector, args.eval_images, seed=args.seed, w=w)
    for name, value in acc.items():
        print(f"{name:>10}: {value:.2%}")
    codec_acc = accuracy(detector, args.eval_images, seed=args.seed, w=w, codec=codec) if codec is not None else None
    if codec_acc:
        print("through the VAE: " + ", ".join(f"{k} {v:.2%}" for k, v in codec_acc.items()))
    print(f"trained {args.steps} steps in {seconds:.0f} s")
    save_detector(detector, args.out)
    report = {
        "accuracy": acc,
        "steps": args.steps,
        "seconds": round(seconds, 1),
        "batch": args.batch,
        "seed": args.seed,
        "eval_images": args.eval_images,
        "threads": args.threads,
    }
    if args.world != "one-object":
        report["world"] = args.world
    if codec_acc:
        report["accuracy_through_vae"] = codec_acc
    Path(str(args.out) + ".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
