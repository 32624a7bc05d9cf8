"""activation-matched: an interference-aware weight-space merge (RegMean; Mix-of-Show's gradient fusion).

Per targeted layer it uses the weight that best reproduces each LoRA's own outputs on that LoRA's own
inputs::

    W = argmin_W  sum_i ||W X_i - (W0 + dW_i) X_i||^2 + lam ||W - W0||^2
      = W0 + (sum_i dW_i G_i) (sum_i G_i + lam I)^-1,        G_i = X_i X_i^T / n_i

``X_i`` are the layer's inputs while LoRA ``i`` alone (at its user weights) renders prompts made of its
trigger words (``templates``), over ``profile_steps`` sampling steps: hidden states for the text encoder,
cross-attention keys/values' token states, spatial features (unfolded patches for LoCon convolutions).
Since ``dW_i = s_i B_i A_i``, the result is merge with each down factor replaced by
``A_i' = A_i G_i (G + lam I)^-1``: :meth:`derived_adapters` returns those adapters and the pipeline runs
them exactly as merge (one pass per step, fusable), then detaches them.

``lam = alpha * mean(diag(G))`` (``alpha``): small values follow the activations closely (when two LoRAs
see the same inputs, their deltas are averaged there rather than summed); large values shrink every delta
towards the base. Layers whose ``d_in`` exceeds ``max_features`` (default 4096: a float32 Gram of 64 MiB)
keep their plain delta, as do SHiRA layers, layers of the other kinds (LoHa, LoKr, DoRA, IA3, OFT...) and
layers outside ``scope`` (``all``, ``text``: the text
encoders only, ``kv``: text encoders and cross-attention keys/values, ``unet``: the denoiser only).

Cost: one profiling pass per LoRA (cached on disk by the file's sha256, the base model and the settings;
see :mod:`lora_composer.fusion.activation_stats`), one ``d_in x d_in`` solve per layer per generation, then
merge's cost. Without a pipeline (a bare ``StrategyContext``) it is merge.
"""

from __future__ import annotations

import dataclasses

from lora_composer.adapters.types import LayerDelta
from lora_composer.fusion import activation_stats as stats
from lora_composer.fusion.base import DerivedMerge
from lora_composer.vocab import TEXT_ENCODERS

SCOPES = ("all", "text", "kv", "unet")


def _in_scope(key: str, scope: str) -> bool:
    text = key.split(".", 1)[0] in TEXT_ENCODERS
    if scope == "all":
        return True
    if scope == "text":
        return text
    if scope == "unet":
        return not text
    return text or (".attn2." in key and key.endswith((".to_k", ".to_v")))  # kv


class ActivationMatchedStrategy(DerivedMerge):
    name = "activation-matched"
    suffix = "~matched"

    def __init__(
        self,
        alpha: float = 0.1,
        profile_steps: int = 10,
        profile_images: int = 2,
        templates: tuple | str = ("{trigger}", "a picture of {trigger}"),
        scope: str = "all",
        max_features: int = 4096,
        guidance: float | None = None,
        cache: bool = True,
    ):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if int(profile_steps) < 1 or int(profile_images) < 1:
            raise ValueError("profile_steps and profile_images must be >= 1")
        self.alpha = float(alpha)
        self.profile_steps = int(profile_steps)
        self.profile_images = int(profile_images)
        self.templates = (templates,) if isinstance(templates, str) else tuple(templates)
        if not self.templates or any("{trigger}" not in t for t in self.templates):
            raise ValueError("every template must contain {trigger}")
        self.scope = scope
        self.max_features = int(max_features)
        self.guidance = guidance
        self.cache = bool(cache)

    def settings(self) -> dict:
        """The collection settings (part of the Gram cache key)."""
        cfg = getattr(self, "context", None) and self.context.cfg
        guidance = self.guidance if self.guidance is not None else (5.0 if cfg or cfg is None else 1.0)
        return {
            "templates": list(self.templates),
            "steps": self.profile_steps,
            "images": self.profile_images,
            "guidance": float(guidance),
            "max_features": self.max_features,
            "seed": 0,
            "layers": "lora",
        }

    def build_derived(self) -> dict | None:
        ctx = self.context
        if ctx.runtime is None or ctx.pipe is None:
            return None  # nothing to profile: plain merge
        runtime = ctx.runtime
        settings = self.settings()
        model = stats.model_fingerprint(ctx.pipe)
        text = runtime.text_mix.weights[0]
        grams, downs = {}, {}
        for i, name in enumerate(self.adapters):
            unet_w = float(self.user_weights[i])
            te_w = float(text[runtime.slots[name]]) if name in runtime.slots else unet_w
            if unet_w == 0 and te_w == 0:
                continue
            grams[name] = stats.grams_for(
                ctx.pipe, runtime, ctx.adapter(name), unet_w, te_w, settings, model=model, use_cache=self.cache
            )
        layers: dict[str, list[str]] = {}
        for name, g in grams.items():
            deltas = ctx.adapter(name).deltas
            for key in g:
                if _in_scope(key, self.scope) and isinstance(deltas.get(key), LayerDelta):
                    layers.setdefault(key, []).append(name)
        for key, names in layers.items():
            adapters = [ctx.adapter(n) for n in names]
            gs = [grams[n][key] for n in names]
            new = stats.matched_downs([a.deltas[key].down for a in adapters], gs, stats.relative_lambda(gs, self.alpha))
            for n, down in zip(names, new):
                downs.setdefault(n, {})[key] = down
        derived = {}
        for name, new in downs.items():
            ad = ctx.adapter(name)
            deltas = dict(ad.deltas)
            for key, down in new.items():
                deltas[key] = dataclasses.replace(deltas[key], down=down)
            derived[name] = dataclasses.replace(ad, name=name + self.suffix, deltas=deltas)
        return derived
