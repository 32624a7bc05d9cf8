"""fit: merge with per-LoRA, per-output-column coefficients fitted once per LoRA set (ZipLoRA for N LoRAs).

ZipLoRA (Shah et al. 2023) merges a subject and a style LoRA as ``dW = m_1 (.) dW_1 + m_2 (.) dW_2``, one
learnt coefficient per output column, per LoRA and layer, so that the merged model reproduces each LoRA's
own predictions on that LoRA's own prompts, while a cosine penalty keeps the columns the LoRAs use apart.
LoRA.rar's point is that such coefficients belong to the *set*: fit once, then render at merge's cost.
Here, for ``N`` LoRAs, with only the files and their trigger words (no composed pictures):

- teacher ``i``: LoRA ``i`` alone (its UNet and text-encoder weights); prompts: ``templates`` with its
  trigger words; latents: the teacher's own samples (``sample_steps`` steps, seed ``seed``, which no
  evaluation uses), noised to the timesteps ``levels`` (fractions of the schedule);
- student: every LoRA at once, ``up_i`` rows scaled by ``m_i`` (init 1: merge), on every LoRA's rows;
- loss: per LoRA, ``||student - teacher_i||^2 / ||base - teacher_i||^2`` over its rows (conditional and
  unconditional predictions: what guidance combines), averaged, plus ``ortho`` times the mean ``|cos|``
  between the coefficient-weighted column norms (``m_i * ||row c of dW_i||``) of every pair of LoRAs
  sharing a layer;
- ``iters`` Adam steps (``lr``), a tqdm bar named ``fit``.

The coefficients are cached by :mod:`lora_composer.fusion.fit_cache` (files' hashes, weights, base model,
these settings). :meth:`derived_adapters` returns each LoRA with its ``up`` factors' rows scaled, so the
pipeline attaches, drives (and fuses) them exactly as merge. Layers of other kinds (LoHa, LoKr, DoRA,
SHiRA...) are left out of the fit and keep their delta. Needs a UNet pipeline with one text encoder (SD1.5
shape); without a pipeline (a bare ``StrategyContext``) it is merge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

from lora_composer.adapters.types import LayerDelta
from lora_composer.errors import ComposerError
from lora_composer.fusion import activation_stats as stats
from lora_composer.fusion import fit_cache
from lora_composer.fusion.base import DerivedMerge
from lora_composer.vocab import TEXT_ENCODERS

FIT_SEED = 20261  # latents and noise of the fit: no evaluation seed (0-135, 1000s, 3000s, 5000s) is this one
FIT_LOG: list[dict] = []  # one entry per fit run in this process (adapters, iterations, CPU seconds, losses)


@dataclasses.dataclass
class _Entry:
    """One layer the set patches: its module, the LoRAs on it and their stacked factors."""

    key: str
    module: torch.nn.Module
    owners: list[int]  # adapter indices
    downs: list[torch.Tensor]  # fp32, [r, in] or [r, in, kh, kw]
    ups: list[torch.Tensor]  # fp32, [out, r]
    coefs: list[float]  # weight * alpha / r per owner
    conv: bool

    def delta(self, x: torch.Tensor, ups: list[torch.Tensor], picks: list[int]) -> torch.Tensor:
        down = torch.cat([self.downs[p] for p in picks], 0)
        up = torch.cat(ups, 1)
        if self.conv:
            m = self.module
            h = F.conv2d(x, down, None, m.stride, m.padding, m.dilation)
            return F.conv2d(h, up[:, :, None, None])
        return F.linear(F.linear(x, down), up)


class _Hooks:
    """Forward hooks adding the set's deltas: ``teacher`` (one LoRA alone), ``student`` (all, scaled rows) or ``base``."""

    def __init__(self, entries: list[_Entry], params: list[torch.Tensor]):
        self.entries, self.params = entries, params
        self.mode: tuple = ("base",)
        self.grams: dict[int, list[torch.Tensor]] = {}  # target "layers": per entry [G [out, n, n], b [out, n]]
        self.handles = [e.module.register_forward_hook(self._hook(n)) for n, e in enumerate(entries)]

    def _hook(self, n: int):
        def hook(module, args, output):
            e = self.entries[n]
            if self.mode[0] == "teacher":
                if self.mode[1] not in e.owners:
                    return None
                p = e.owners.index(self.mode[1])
                return output + e.delta(args[0], [e.ups[p] * e.coefs[p]], [p])
            if self.mode[0] == "collect":  # teacher i's forward, recording every owner's delta on its inputs
                i = self.mode[1]
                if i not in e.owners:
                    return None
                ys = [e.delta(args[0], [e.ups[p] * e.coefs[p]], [p]) for p in range(len(e.owners))]
                self.accumulate(n, ys, e.owners.index(i), e.conv)
                return output + ys[e.owners.index(i)]
            if self.mode[0] == "student":
                m = self.params[n]
                ups = [e.ups[p] * (e.coefs[p] * m[p]).unsqueeze(1) for p in range(len(e.owners))]
                return output + e.delta(args[0], ups, list(range(len(e.owners))))
            return None

        return hook

    def accumulate(self, n: int, ys: list[torch.Tensor], own: int, conv: bool) -> None:
        """Per output column ``c``: ``G[c] += Y_c^T Y_c`` and ``b[c] += Y_c^T y_own,c`` over positions, divided by
        the teacher's own energy on this layer (so every LoRA counts alike)."""
        flat = [(y.movedim(1, -1) if conv else y).reshape(-1, y.shape[1] if conv else y.shape[-1]).double() for y in ys]
        stack = torch.stack(flat)  # [owners, positions, out]
        energy = (flat[own] ** 2).sum().clamp(min=1e-30)
        g = torch.einsum("jpc,kpc->cjk", stack, stack) / energy
        b = torch.einsum("jpc,pc->cj", stack, flat[own]) / energy
        if n in self.grams:
            self.grams[n][0].add_(g)
            self.grams[n][1].add_(b)
        else:
            self.grams[n] = [g, b]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def column_norms(e: _Entry) -> list[torch.Tensor]:
    """``||row c of coef * up @ down||`` per output ``c``, per owner (the column weights of the cosine term)."""
    out = []
    for p in range(len(e.owners)):
        a = e.downs[p].reshape(e.downs[p].shape[0], -1)
        g = a @ a.T
        out.append(((e.ups[p] @ g) * e.ups[p]).sum(1).clamp(min=0).sqrt() * abs(e.coefs[p]))
    return out


def pair_cosines(entries: list[_Entry], params: list[torch.Tensor], norms: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean ``|cos(m_i * norm_i, m_j * norm_j)|`` over LoRA pairs sharing a layer (0 when none do)."""
    terms = []
    for e, m, nrm in zip(entries, params, norms):
        v = [m[p] * nrm[p] for p in range(len(e.owners))]
        for i in range(len(v)):
            for j in range(i + 1, len(v)):
                terms.append((v[i] * v[j]).sum().abs() / (v[i].norm() * v[j].norm() + 1e-12))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def prompts_for(adapter, templates) -> list[str]:
    """Every template with every trigger word; a LoRA without trigger words cannot be fitted."""
    triggers = [t.strip() for t in adapter.metadata.trigger_words if t.strip()]
    if not triggers:
        raise ComposerError(
            f"strategy 'fit': LoRA '{adapter.name}' has no trigger words to build its prompts from "
            "(add them in a .civitai.info or .json sidecar, or use merge)"
        )
    return [tpl.format(trigger=t) for t in triggers for tpl in templates]


@contextlib.contextmanager
def _fitting_state(pipe, runtime):
    """The runtime's own deltas off, base weights frozen, progress bars quiet; all restored on exit."""
    enabled = (runtime.denoiser_mix.enabled, runtime.text_mix.enabled)
    modules = [pipe.unet, pipe.text_encoder]
    grads = [[p.requires_grad for p in m.parameters()] for m in modules]
    bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    try:
        runtime.disable()
        for m in modules:
            m.requires_grad_(False)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        yield
    finally:
        runtime.denoiser_mix.set_enabled(enabled[0])
        runtime.text_mix.set_enabled(enabled[1])
        for m, flags in zip(modules, grads):
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)
        if hasattr(pipe, "_progress_bar_config"):
            pipe._progress_bar_config = bar


def _encode(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


def fit_coefficients(
    pipe, runtime, adapters: list, weights: list[tuple[float, float]], settings: dict, progress: bool = True
) -> dict[str, torch.Tensor]:
    """``{"<index>|<layer key>": m [out]}`` for the LoRAs ``adapters`` at ``weights`` (UNet, text encoder)."""
    from tqdm.auto import tqdm

    if (
        getattr(pipe, "unet", None) is None
        or getattr(pipe, "text_encoder", None) is None
        or getattr(pipe, "text_encoder_2", None) is not None
    ):
        raise ComposerError("strategy 'fit' fits UNet pipelines with one text encoder (SD1.5 shape); use merge here")
    prompts = [prompts_for(ad, settings["templates"]) for ad in adapters]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    entries: list[_Entry] = []
    keys = list(dict.fromkeys(k for ad in adapters for k, d in ad.deltas.items() if isinstance(d, LayerDelta)))
    for key in keys:
        layer = runtime.layers.get(key)
        owners = [i for i, ad in enumerate(adapters) if isinstance(ad.deltas.get(key), LayerDelta)]
        if layer is None or not owners:
            continue
        if settings["scope"] == "unet" and key.split(".", 1)[0] in TEXT_ENCODERS:
            continue
        ds = [adapters[i].deltas[key] for i in owners]
        text = key.split(".", 1)[0] in TEXT_ENCODERS
        entries.append(
            _Entry(
                key,
                layer.module,
                owners,
                [d.down.float() for d in ds],
                [d.up.float().reshape(d.up.shape[0], -1) for d in ds],
                [weights[i][1 if text else 0] * d.scale for i, d in zip(owners, ds)],
                ds[0].down.dim() == 4,
            )
        )
    params = [torch.ones(len(e.owners), e.ups[0].shape[0], requires_grad=True) for e in entries]
    norms = [column_norms(e) for e in entries]
    unet, sched = pipe.unet, pipe.scheduler
    device = unet.device
    gen = torch.Generator().manual_seed(int(settings["seed"]))
    hooks = _Hooks(entries, params)
    log: dict = {"adapters": [ad.name for ad in adapters], "layers": len(entries)}
    try:
        with _fitting_state(pipe, runtime):
            # the teachers' own samples, noised to the fitting levels
            xs, ts, owner, cond_ids = [], [], [], []
            acp = sched.alphas_cumprod.float()
            n_train = int(acp.shape[0])
            with torch.no_grad():
                for i, ps in enumerate(prompts):
                    hooks.mode = ("teacher", i)
                    out = pipe(
                        prompt=ps,
                        num_inference_steps=int(settings["sample_steps"]),
                        guidance_scale=float(settings["guidance"]),
                        num_images_per_prompt=int(settings["images"]),
                        generator=torch.Generator().manual_seed(int(settings["seed"]) + i),
                        output_type="latent",
                    )
                    x0 = out.images.float().cpu()
                    for level in settings["levels"]:
                        t = min(n_train - 1, max(0, int(round(float(level) * n_train))))
                        noise = torch.randn(x0.shape, generator=gen)
                        a = acp[t]
                        xs.append(a.sqrt() * x0 + (1 - a).sqrt() * noise)
                        ts += [t] * x0.shape[0]
                        owner += [i] * x0.shape[0]
                        cond_ids += [
                            sum(len(p) for p in prompts[:i]) + j // int(settings["images"]) for j in range(x0.shape[0])
                        ]
            x = torch.cat(xs).to(device)
            t = torch.tensor(ts, device=device)
            owner_t = torch.tensor(owner)
            cond_ids_t = torch.tensor(cond_ids)
            all_prompts = [p for ps in prompts for p in ps] + [""]
            rows = x.shape[0]
            # inputs: every row once with its prompt, once with the empty prompt (guidance's two halves)
            x2, t2 = torch.cat([x, x]), torch.cat([t, t])
            emb_index = torch.cat([cond_ids_t, torch.full((rows,), len(all_prompts) - 1)])
            owner2 = torch.cat([owner_t, owner_t])

            def predict(mode, rows=None) -> torch.Tensor:
                hooks.mode = mode
                emb = _encode(pipe, all_prompts)[emb_index.to(device)]
                if rows is None:
                    return unet(x2, t2, encoder_hidden_states=emb).sample.float()
                return unet(x2[rows], t2[rows], encoder_hidden_states=emb[rows]).sample.float()

            if settings["target"] == "layers":  # closed form per column on the teachers' own layer inputs
                with torch.no_grad():
                    for i in range(len(adapters)):
                        predict(("collect", i), (owner2 == i).to(device))
                    for n, (g, b) in hooks.grams.items():
                        ridge = float(settings["ridge"]) * float(torch.diagonal(g, dim1=1, dim2=2).mean())
                        eye = torch.eye(g.shape[-1], dtype=g.dtype)
                        m = torch.linalg.solve(g + ridge * eye, (b + ridge).unsqueeze(-1)).squeeze(-1)  # [out, owners]
                        params[n].data.copy_(m.T.float())
                    fitted = [p.detach().clone() for p in params]
                    log.update(cos=round(float(pair_cosines(entries, params, norms)), 4))
                    for p in params:
                        p.data.fill_(1.0)
                    log.update(merge_cos=round(float(pair_cosines(entries, params, norms)), 4))
                    for p, f in zip(params, fitted):
                        p.data.copy_(f)
                log.update(
                    target="layers",
                    cpu_s=round(time.process_time() - cpu0, 2),
                    wall_s=round(time.perf_counter() - wall0, 2),
                )
                FIT_LOG.append(log)
                return {
                    f"{i}|{e.key}": params[n][p].detach().clone()
                    for n, e in enumerate(entries)
                    for p, i in enumerate(e.owners)
                }

            with torch.no_grad():
                base = predict(("base",))
                target = torch.empty_like(base)
                for i in range(len(adapters)):
                    sel = (owner2 == i).to(device)
                    target[sel] = predict(("teacher", i))[sel]
                scale = torch.stack(
                    [((base - target)[(owner2 == i).to(device)] ** 2).sum() for i in range(len(adapters))]
                ).clamp(min=1e-12)
            masks = [(owner2 == i).to(device) for i in range(len(adapters))]
            opt = torch.optim.Adam(params, lr=float(settings["lr"]))
            losses = []
            bar = tqdm(
                range(int(settings["iters"])),
                desc="fit",
                unit="step",
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            )
            for _ in bar:
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    pred = predict(("student",))
                    err = torch.stack([((pred - target)[mk] ** 2).sum() for mk in masks]) / scale
                    cos = pair_cosines(entries, params, norms)
                    loss = err.mean() + float(settings["ortho"]) * cos
                    loss.backward()
                opt.step()
                losses.append((float(err.mean().detach()), float(cos.detach())))
                bar.set_postfix(match=f"{losses[-1][0]:.3f}", cos=f"{losses[-1][1]:.3f}")
            bar.close()
            with torch.no_grad():
                hooks.mode = ("student",)
                # merge's error, for the record
                saved = [p.detach().clone() for p in params]
                for p in params:
                    p.data.fill_(1.0)
                pred = predict(("student",))
                merge_err = float((torch.stack([((pred - target)[mk] ** 2).sum() for mk in masks]) / scale).mean())
                merge_cos = float(pair_cosines(entries, params, norms))
                for p, s in zip(params, saved):
                    p.data.copy_(s)
    finally:
        hooks.remove()
    log.update(
        iters=int(settings["iters"]),
        rows=int(x2.shape[0]),
        cpu_s=round(time.process_time() - cpu0, 2),
        wall_s=round(time.perf_counter() - wall0, 2),
        merge_match=round(merge_err, 4),
        merge_cos=round(merge_cos, 4),
        start=[round(v, 4) for v in losses[0]] if losses else None,
        end=[round(v, 4) for v in losses[-1]] if losses else None,
    )
    FIT_LOG.append(log)
    return {
        f"{i}|{e.key}": params[n][p].detach().clone() for n, e in enumerate(entries) for p, i in enumerate(e.owners)
    }


def scaled(adapter, index: int, coefficients: dict[str, torch.Tensor], name: str):
    """``adapter`` with each fitted layer's ``up`` rows scaled by its coefficients, under ``name``."""
    deltas = dict(adapter.deltas)
    for key, d in adapter.deltas.items():
        m = coefficients.get(f"{index}|{key}")
        if m is None or not isinstance(d, LayerDelta):
            continue
        shape = (-1,) + (1,) * (d.up.dim() - 1)
        deltas[key] = dataclasses.replace(d, up=(d.up.float() * m.reshape(shape)).to(d.up.dtype))
    return dataclasses.replace(adapter, name=name, deltas=deltas)


class FitStrategy(DerivedMerge):
    name = "fit"
    suffix = "~fit"
    fitted = True

    def __init__(
        self,
        iters: int = 30,
        lr: float = 0.1,
        ortho: float = 0.1,
        levels: tuple | float = (0.4, 0.8),
        templates: tuple | str = ("{trigger}",),
        images: int = 1,
        sample_steps: int = 8,
        guidance: float | None = None,
        scope: str = "all",
        seed: int = FIT_SEED,
        target: str = "prediction",
        ridge: float = 0.01,
        cache: bool = True,
        progress: bool = True,
    ):
        if target not in ("prediction", "layers"):
            raise ValueError(f"target must be prediction or layers, got {target!r}")
        if float(ridge) <= 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        self.target, self.ridge = target, float(ridge)
        if int(iters) < 0 or float(lr) <= 0 or float(ortho) < 0:
            raise ValueError("iters must be >= 0, lr > 0, ortho >= 0")
        if scope not in ("all", "unet"):
            raise ValueError(f"scope must be all or unet, got {scope!r}")
        self.levels = (float(levels),) if isinstance(levels, (int, float)) else tuple(float(v) for v in levels)
        if not self.levels or any(not 0 <= v <= 1 for v in self.levels):
            raise ValueError("levels must be fractions of the noise schedule in [0, 1]")
        self.templates = (templates,) if isinstance(templates, str) else tuple(templates)
        if not self.templates or any("{trigger}" not in t for t in self.templates):
            raise ValueError("every template must contain {trigger}")
        if int(images) < 1 or int(sample_steps) < 1:
            raise ValueError("images and sample_steps must be >= 1")
        self.iters, self.lr, self.ortho = int(iters), float(lr), float(ortho)
        self.images, self.sample_steps, self.guidance = int(images), int(sample_steps), guidance
        self.scope, self.seed, self.cache, self.progress = scope, int(seed), bool(cache), bool(progress)
        self.cache_hit: bool | None = None

    def settings(self) -> dict:
        """The fit's parameters (part of the cache key)."""
        cfg = getattr(self, "context", None) and self.context.cfg
        guidance = self.guidance if self.guidance is not None else (5.0 if cfg or cfg is None else 1.0)
        return {
            "iters": self.iters,
            "lr": self.lr,
            "ortho": self.ortho,
            "levels": list(self.levels),
            "templates": list(self.templates),
            "images": self.images,
            "sample_steps": self.sample_steps,
            "guidance": float(guidance),
            "scope": self.scope,
            "seed": self.seed,
            "loss": "cond+uncond",
            "target": self.target,
            **({"ridge": self.ridge} if self.target == "layers" else {}),
        }

    def build_derived(self) -> dict | None:
        self.cache_hit = None
        ctx = self.context
        if ctx.runtime is None or ctx.pipe is None:
            return None  # nothing to fit against: plain merge
        runtime = ctx.runtime
        text = runtime.text_mix.weights[0]
        ads, ws = [], []
        for i, name in enumerate(self.adapters):
            unet_w = float(self.user_weights[i])
            ws.append((unet_w, float(text[runtime.slots[name]]) if name in runtime.slots else unet_w))
            ads.append(ctx.adapter(name))
        settings = self.settings()
        key = fit_cache.key([stats.adapter_identity(a) for a in ads], ws, stats.model_fingerprint(ctx.pipe), settings)
        coefs = fit_cache.load(key) if self.cache else None
        self.cache_hit = coefs is not None
        if coefs is None:
            coefs = fit_coefficients(ctx.pipe, runtime, ads, ws, settings, progress=self.progress)
            if self.cache:
                fit_cache.store(
                    key,
                    coefs,
                    {"adapters": [a.name for a in ads], "settings": settings, "log": FIT_LOG[-1] if FIT_LOG else {}},
                )
        return {a.name: scaled(a, i, coefs, a.name + self.suffix) for i, a in enumerate(ads)}

    def describe(self) -> dict:
        return {"iters": self.iters, "ortho": self.ortho, "lr": self.lr, "levels": json.dumps(list(self.levels))}
