"""Detectors: a small CNN that says which value of every category a 64x64 picture shows.

They are the mini world's judge: a composed LoRA image scores by whether the detector finds the concepts its
prompt asked for. The detector is trained on freshly drawn pictures of every value, base and LoRA, degraded
the way a diffusion model's output is (blur, noise, colour drift, smoothing) so that imperfect generations
are still read by what they show, not by how clean they are.

    python -m lora_composer.miniworld.detectors --out detectors.safetensors [--steps N] [--threads 1]
    python -m lora_composer.miniworld.detectors --world community --codec --out weights/community/detectors.safetensors

Each world (``world``, ``community``: a module with ``CATEGORIES`` and ``sample``) has its own detector; the
file records the categories it was trained for and is refused by another world.
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
from torch import nn

from lora_composer.errors import ComposerError
from lora_composer.miniworld import world
from lora_composer.miniworld.train import to_tensor

DEFAULT_STEPS = 1200
DEFAULT_BATCH = 64
FORMAT = "lora-composer-miniworld-detector"
ALL_VALUES = {c.name: c.values for c in world.CATEGORIES}
_TRAIN_STREAM, _EVAL_STREAM = 0, 1  # numpy seed-sequence keys: training and evaluation never share images


class DetectorFileError(ComposerError, ValueError):
    """A detector file is missing, unreadable or made for another version of the mini world."""

    def __init__(self, path, cause: str):
        self.path = str(path)
        self.cause = " ".join(str(cause).split())
        super().__init__(f"{self.path}: {self.cause}")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
    )


class Detector(nn.Module):
    """Four conv blocks (64 -> 4 pixels) shared by one linear head per category (``categories``: the world's,
    default the one-object world's)."""

    def __init__(self, width: int = 32, categories=None):
        super().__init__()
        self.categories = tuple(categories or world.CATEGORIES)
        self.features = nn.Sequential(
            _block(3, width // 2),
            _block(width // 2, width),
            _block(width, 2 * width),
            _block(2 * width, 2 * width),
            nn.Flatten(),
            nn.Dropout(0.1),
        )
        flat = 2 * width * (world.SIZE // 16) ** 2
        self.heads = nn.ModuleDict({c.name: nn.Linear(flat, len(c.values)) for c in self.categories})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per category for float ``(n, 3, 64, 64)`` in [-1, 1]."""
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def probs(self, images, batch: int = 256) -> dict[str, torch.Tensor]:
        """Softmax per category, ``(n, len(values))``, for PIL images, uint8 ``(n, H, W, 3)`` or float tensors."""
        x = as_input(images)
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            chunks = [self(x[i : i + batch].to(device)) for i in range(0, len(x), batch)]
        finally:
            self.train(was_training)
        empty = {c.name: torch.zeros(0, len(c.values)) for c in self.categories}
        return {
            name: torch.cat([ch[name].cpu() for ch in chunks] or [logits]).softmax(-1) for name, logits in empty.items()
        }

    def predict(self, images) -> list[dict[str, str]]:
        """The most likely value of every category, per image."""
        probs = self.probs(images)
        n = len(next(iter(probs.values())))
        best = {c.name: probs[c.name].argmax(-1).tolist() for c in self.categories}
        return [{c.name: c.values[best[c.name][i]] for c in self.categories} for i in range(n)]


# ------------------------------------------------------------------------------------------------ inputs
def as_input(images) -> torch.Tensor:
    """Any accepted image batch as the detector's float ``(n, 3, 64, 64)`` in [-1, 1] (bilinear resize)."""
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("a list of images must hold PIL images only")
        size = (world.SIZE, world.SIZE)
        rgb = [im.convert("RGB") for im in images]
        images = (
            np.zeros((0, *size, 3), np.uint8)
            if not rgb
            else np.stack([np.asarray(im if im.size == size else im.resize(size, Image.BILINEAR)) for im in rgb])
        )
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (n, H, W, 3), got {images.dtype} {images.shape}")
        images = to_tensor(images)
    if (
        not isinstance(images, torch.Tensor)
        or not images.is_floating_point()
        or images.ndim != 4
        or images.shape[1] != 3
    ):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"expected float images (n, 3, H, W) in [-1, 1], got {shape}")
    x = images.detach().float()
    if x.shape[-2:] != (world.SIZE, world.SIZE) and len(x):
        x = F.interpolate(x, size=(world.SIZE, world.SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


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


# --------------------------------------------------------------------------------------------------- files
def _categories_metadata(categories=world.CATEGORIES) -> str:
    return json.dumps({c.name: list(c.values) for c in categories})


def save_detector(detector: Detector, path) -> Path:
    """Write ``path`` (safetensors, atomically) with the category/value lists it was trained for in its header."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "categories": _categories_metadata(detector.categories)})
    os.replace(tmp, path)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise DetectorFileError(
            path, "no such detector file (train one: python -m lora_composer.miniworld.detectors --out PATH)"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: truncated, corrupt, not safetensors
        raise DetectorFileError(path, f"not a readable safetensors file (truncated or corrupt?): {e}") from None


def _mismatch(stored, current: dict[str, list[str]]) -> str:
    """Only the categories that differ, so the error stays readable on one line."""
    if not isinstance(stored, dict) or list(stored) != list(current):
        names = list(stored) if isinstance(stored, dict) else stored
        return f"trained for categories {json.dumps(names)}, but the mini world has {json.dumps(list(current))}"
    diffs = [
        f"{name} {json.dumps(stored[name])} (now {json.dumps(values)})"
        for name, values in current.items()
        if stored[name] != values
    ]
    return "trained for other values: " + ", ".join(diffs)


def load_detector(path, w=world) -> Detector:
    """The detector in ``path``, refused unless it was trained for world ``w``'s categories and values."""
    path = Path(path)
    tensors, header = _read(path)
    if header.get("format") != FORMAT:
        raise DetectorFileError(path, f"not a mini-world detector (format {header.get('format')!r})")
    try:
        stored = json.loads(header.get("categories", ""))
    except json.JSONDecodeError:
        raise DetectorFileError(path, "its 'categories' metadata is not JSON") from None
    current = json.loads(_categories_metadata(w.CATEGORIES))
    if stored != current:
        raise DetectorFileError(
            path, f"{_mismatch(stored, current)}; retrain it (python -m lora_composer.miniworld.detectors --out {path})"
        )
    detector = Detector(categories=w.CATEGORIES)
    try:
        detector.load_state_dict(tensors)
    except RuntimeError as e:
        raise DetectorFileError(path, f"weights do not fit the detector: {e}") from None
    return detector.eval()


# ----------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_composer.miniworld.detectors", description=__doc__.splitlines()[0])
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
