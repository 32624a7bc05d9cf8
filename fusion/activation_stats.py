"""Input statistics of patched layers for activation-matched fusion, and its closed form.

``collect_grams`` runs the pipeline with one adapter alone on prompts built from its trigger words and
accumulates, per layer the adapter targets, the second moment of the layer's inputs ``G = X X^T / n``
(``d_in x d_in``; a Conv2d's inputs are its unfolded patches, ``d_in = in_channels * kh * kw``, ordered as
``down.reshape(r, -1)``). ``grams_for`` caches the result on disk under
``cache_dir()/activation-grams``, keyed by the LoRA file's sha256, the base model's fingerprint and the
collection settings, so each LoRA is profiled once per model and setting.

``matched_downs`` is the closed form: with ``G = sum_i G_i`` and ``M = G + lam I``,
``A_i' = A_i G_i M^-1`` (``M`` symmetric positive definite for ``lam > 0``), so that
``W0 + sum_i s_i B_i A_i'`` is the minimiser of ``sum_i ||W X_i - (W0 + s_i B_i A_i) X_i||^2 + lam ||W - W0||^2``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path

import torch

from lora_composer.adapters.types import LayerDelta
from lora_composer.cache import cache_dir

CACHE_VERSION = 1
_MEMORY: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # cache key -> grams, a few recent sets
_MEMORY_SIZE = 16
PROFILE_LOG: list[dict] = []  # one entry per collection pass run in this process (adapter, seconds, layers)


# -- closed form ----------------------------------------------------------------------------------------
def flat_down(down: torch.Tensor) -> torch.Tensor:
    """``[r, d_in]`` view of a Linear (``[r, in]``) or LoCon (``[r, in, kh, kw]``) down factor."""
    return down.reshape(down.shape[0], -1)


def matched_downs(downs: list[torch.Tensor], grams: list[torch.Tensor], lam: float) -> list[torch.Tensor]:
    """``A_i' = A_i G_i (sum_j G_j + lam I)^-1`` for every adapter ``i`` of one layer (float64 solve).

    ``downs[i]``: ``[r_i, d]`` (or a conv kernel, flattened and reshaped back); ``grams[i]``: ``[d, d]``.
    ``lam`` is absolute (see :func:`relative_lambda`). With ``lam = 0`` and a singular ``G`` the
    pseudo-inverse is used.
    """
    g = sum(x.double() for x in grams)
    d = g.shape[0]
    m = g + float(lam) * torch.eye(d, dtype=torch.float64)
    # right-hand sides G_i A_i^T, all adapters at once: M Z = [G_1 A_1^T ... G_n A_n^T]; A_i' = Z_i^T
    rhs = torch.cat([gi.double() @ flat_down(a).double().T for a, gi in zip(downs, grams)], dim=1)
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        z = torch.cholesky_solve(rhs, chol)
    else:
        z = torch.linalg.pinv(m, hermitian=True) @ rhs
    out, start = [], 0
    for a in downs:
        r = a.shape[0]
        out.append(z[:, start : start + r].T.reshape(a.shape).to(a.dtype))
        start += r
    return out


def relative_lambda(grams: list[torch.Tensor], alpha: float) -> float:
    """``alpha * mean(diag(sum_i G_i))``: a ridge on the Gram's own scale (RegMean's way)."""
    g = sum(x.double() for x in grams)
    return float(alpha) * float(torch.diagonal(g).mean())


# -- identity of a model, a LoRA and a setting --------------------------------------------------------------
def model_fingerprint(pipe) -> str:
    """A cheap identity of the base weights: name, and per parameter its shape and 64 strided values."""
    h = hashlib.sha256()
    h.update(str(getattr(getattr(pipe, "config", None), "_name_or_path", "")).encode())
    for comp in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if not isinstance(module, torch.nn.Module):
            continue
        h.update(comp.encode())
        for name, p in module.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def adapter_identity(adapter) -> str:
    """The LoRA file's sha256, else a hash of the factors (adapters built in memory)."""
    if adapter.metadata.sha256:
        return adapter.metadata.sha256
    h = hashlib.sha256()
    for key in sorted(adapter.deltas):
        d = adapter.deltas[key]
        h.update(key.encode())
        for t in (getattr(d, "down", None), getattr(d, "up", None), getattr(d, "values", None)):
            if t is not None:
                h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(adapter, model: str, settings: dict) -> str:
    blob = json.dumps(
        {"v": CACHE_VERSION, "lora": adapter_identity(adapter), "model": model, "settings": settings}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_dir() / "activation-grams" / f"{key}.safetensors"


# -- collection -------------------------------------------------------------------------------------------
def profile_prompts(adapter, templates) -> list[str]:
    """Prompts for one adapter: every template with every trigger word (the name when it has none)."""
    triggers = [t for t in adapter.metadata.trigger_words if t.strip()] or [
        adapter.name.replace("-", " ").replace("_", " ")
    ]
    return [tpl.format(trigger=t) for t in triggers for tpl in templates]


class _Accumulator:
    """A forward pre-hook adding ``X X^T`` of a module's inputs (unfolded patches for a Conv2d)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.gram: torch.Tensor | None = None
        self.count = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0].detach()
        if isinstance(module, torch.nn.Conv2d):
            x = torch.nn.functional.unfold(
                x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
            )  # [B, C*kh*kw, L]
            x = x.transpose(1, 2).reshape(-1, x.shape[1])
        else:
            x = x.reshape(-1, x.shape[-1])
        x = x.to(torch.float64 if x.device.type == "cpu" else torch.float32)
        g = x.T @ x
        self.gram = g if self.gram is None else self.gram.add_(g)
        self.count += x.shape[0]

    def result(self) -> torch.Tensor | None:
        self.handle.remove()
        if self.gram is None or not self.count:
            return None
        return (self.gram.double().cpu() / self.count).float()


def collect_grams(
    pipe, runtime, adapter, unet_weight: float, te_weight: float, settings: dict
) -> dict[str, torch.Tensor]:
    """Per targeted layer ``key``, the mean ``x x^T`` of its inputs while ``adapter`` alone acts at its weights.

    ``adapter`` must be attached to ``runtime``; the mixing weights are restored after. ``settings``:
    ``templates``, ``steps``, ``images`` (per prompt), ``guidance``, ``max_features``, ``seed``.
    """
    t0 = time.perf_counter()
    name = adapter.name
    saved_unet = (
        runtime.denoiser_mix.weights.clone(),
        {g: w.clone() for g, w in runtime.denoiser_mix.layer_weights.items()},
    )
    saved_text = runtime.text_mix.weights.clone()
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    accs: dict[str, _Accumulator] = {}
    try:
        for key, delta in adapter.deltas.items():
            layer = runtime.layers.get(key)
            # plain (down, up) layers only: LoHa/LoKr/DoRA/IA3/OFT layers keep their own delta
            if (
                layer is None
                or not isinstance(delta, LayerDelta)
                or flat_down(delta.down).shape[1] > settings["max_features"]
            ):
                continue
            accs[key] = _Accumulator(layer.module)
        runtime.set_weights(unet={name: unet_weight}, text={name: te_weight})
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
        generator = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(int(settings["seed"]))
        pipe(
            prompt=profile_prompts(adapter, settings["templates"]),
            num_inference_steps=int(settings["steps"]),
            guidance_scale=float(settings["guidance"]),
            num_images_per_prompt=int(settings["images"]),
            generator=generator,
            output_type="latent",
        )
    finally:
        grams = {key: acc.result() for key, acc in accs.items()}
        runtime.denoiser_mix.set(*saved_unet)
        runtime.text_mix.set(saved_text)
        if hasattr(pipe, "_progress_bar_config"):
            pipe._progress_bar_config = saved_bar
    grams = {k: g for k, g in grams.items() if g is not None}
    PROFILE_LOG.append({"adapter": name, "seconds": round(time.perf_counter() - t0, 3), "layers": len(grams)})
    return grams


def grams_for(
    pipe,
    runtime,
    adapter,
    unet_weight: float,
    te_weight: float,
    settings: dict,
    model: str | None = None,
    use_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """:func:`collect_grams`, from the memory or disk cache when this LoRA was profiled with these settings."""
    from safetensors.torch import load_file, save_file

    key = cache_key(
        adapter,
        model or model_fingerprint(pipe),
        {**settings, "unet_weight": round(float(unet_weight), 6), "te_weight": round(float(te_weight), 6)},
    )
    if use_cache:
        if key in _MEMORY:
            _MEMORY.move_to_end(key)
            return _MEMORY[key]
        path = cache_path(key)
        if path.is_file():
            try:
                grams = load_file(str(path))
            except Exception:  # a truncated or foreign file: profile again
                grams = None
            if grams is not None:
                _remember(key, grams)
                return grams
    grams = collect_grams(pipe, runtime, adapter, unet_weight, te_weight, settings)
    if use_cache:
        path = cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(
            {k: g.contiguous() for k, g in grams.items()},
            str(tmp),
            metadata={"adapter": adapter.name, "settings": json.dumps(settings, sort_keys=True)},
        )
        tmp.replace(path)
        _remember(key, grams)
    return grams


def _remember(key: str, grams: dict) -> None:
    _MEMORY[key] = grams
    while len(_MEMORY) > _MEMORY_SIZE:
        _MEMORY.popitem(last=False)


def clear_memory() -> None:
    """Forget the in-process copies (the disk cache stays)."""
    _MEMORY.clear()
