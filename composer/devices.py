"""Where a model runs and in which precision, from what a user types (``--device auto``, ``--dtype bf16``).

``auto`` means what a user with that machine expects: the GPU when there is one, in half precision (bf16 for
the DiTs, FLUX.1 and SD3, which overflow in fp16; fp16 for the UNets), and float32 on the CPU, where half
precision is slower and less exact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_composer.errors import ComposerError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def is_dit(model: str) -> bool:
    """Whether ``model`` (a folder or a Hub id) is a DiT pipeline (FLUX.1, SD3), by its model_index or name."""
    from lora_composer.pipeline import DIT_PIPELINES, model_class

    local = Path(model).expanduser() if model else None
    if local is not None and local.exists():
        return model_class(local) in DIT_PIPELINES
    return any(key in str(model).lower() for key in ("flux", "stable-diffusion-3", "sd3"))


def device_and_dtype(
    device: str | None = "auto", dtype: str | None = "auto", model: str = ""
) -> tuple[str, torch.dtype]:
    """``(device, torch dtype)``; a device this machine lacks is a one-line :class:`ComposerError`."""
    device = (device or "auto").strip().lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ComposerError(f"device {device!r}: not a device (cpu, cuda, cuda:N, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ComposerError(f"device {device!r}: this machine has no CUDA device torch can use")
    if kind == "mps" and not has_mps:
        raise ComposerError(f"device {device!r}: this machine has no MPS device torch can use")
    if dtype in (None, "", "auto"):
        dtype = "fp32" if kind == "cpu" else ("bf16" if kind == "cuda" and is_dit(model) else "fp16")
    if dtype not in DTYPES:
        raise ComposerError(f"dtype {dtype!r}: not one of {', '.join(DTYPES)}")
    return device, DTYPES[dtype]
