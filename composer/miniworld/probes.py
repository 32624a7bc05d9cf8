"""Where merge loses concepts: merge's renders with one thing changed, judged like ``compose eval``.

At 3 and 4 LoRAs merge renders every concept in 68% / 42% of pictures (development seed), although each LoRA
alone renders its concept in 94-100%. A missed concept is drawn as a base value (purple as green, pixel style
as filled): the LoRA's push is lost, not garbled. Each probe changes one suspect and measures again:

- ``weight=W``: every LoRA at weight ``W`` instead of 1 (is the push too weak, or too strong, in a stack?).
- ``guidance=G``: another guidance scale.
- ``uncond=F``: the LoRAs at ``F`` times their weight in guidance's unconditional half, so guidance amplifies
  their effect (``F=0``: the base's unconditional prediction).
- ``text-splice``: each LoRA's trigger tokens encoded with that LoRA's text-encoder layers only (the other
  tokens with all of them): do the LoRAs' text-encoder deltas disturb each other's words?
- ``kv-route``: at one LoRA's trigger tokens only that LoRA's cross-attention key/value delta acts: do the
  LoRAs' K/V deltas disturb each other's words inside the UNet?
- ``own-inputs``: in every UNet layer each LoRA's delta is computed on the input that layer gets with that
  LoRA alone (one extra row group per LoRA, run beside the composed one), and the deltas are summed into the
  composed rows: does each LoRA lose its concept because the others change the features it reads?

    python -m lora_composer.miniworld.probes [--sizes 3 4] [--seed 1000] [--threads 2] merge weight=0.8 kv-route
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time

import numpy as np
import torch

from lora_composer.fusion.base import StepPlan, Strategy
from lora_composer.miniworld import assets, world
from lora_composer.miniworld.evaluate import BASE_CATEGORIES, Evaluator, Tally, combinations, scene_for

KV = ("attn2.to_k", "attn2.to_v")


def trigger_positions(tokenizer, prompt: str, words) -> list[int]:
    """Token positions of each of ``words`` in ``prompt`` (as the text encoder sees it, BOS at 0)."""
    ids = tokenizer(prompt).input_ids
    out = []
    for word in words:
        w = tokenizer(word, add_special_tokens=False).input_ids
        out += [p for s in range(len(ids) - len(w) + 1) if ids[s:s + len(w)] == w for p in range(s, s + len(w))]
    return out


@contextlib.contextmanager
def uncond_factor(runtime, factor: float):
    """The denoiser's first half of rows (guidance's unconditional half) at ``factor`` times its LoRA weights."""
    original = runtime.set_denoiser_rows

    def scaled(rows, layer_rows=None):
        rows = rows.clone()
        rows[: rows.shape[0] // 2] *= factor
        return original(rows, layer_rows)

    runtime.set_denoiser_rows = scaled
    try:
        yield
    finally:
        del runtime.set_denoiser_rows


@contextlib.contextmanager
def text_splice(cp, names: list[str]):
    """Each LoRA's trigger tokens come from a text-encoder pass with only that LoRA's text layers."""
    sd, rt = cp.pipe, cp.runtime
    original = sd.encode_prompt

    def encode(prompt, device, n, cfg, negative_prompt=None, **kw):
        pos, neg = original(prompt, device, n, cfg, negative_prompt, **kw)
        mix = rt.text_mix.weights.clone()
        try:
            for name in names:
                only = torch.zeros_like(mix)
                only[:, rt.slots[name]] = mix[:, rt.slots[name]]
                rt.text_mix.set(only)
                own, _ = original(prompt, device, n, False, None, **kw)
                at = trigger_positions(sd.tokenizer, prompt, rt.adapters[name].metadata.trigger_words)
                pos[:, at] = own[:, at]
        finally:
            rt.text_mix.set(mix)
        return pos, neg

    sd.encode_prompt = encode
    try:
        yield
    finally:
        del sd.encode_prompt


@contextlib.contextmanager
def kv_route(cp, names: list[str], prompt: str):
    """At LoRA j's trigger tokens the other LoRAs' cross-attention K/V deltas are taken back out
    (conditional half only; the unconditional prompt has no trigger words)."""
    from lora_composer.adapters.shira import dense_delta

    rt = cp.runtime
    owner = torch.full((cp.pipe.tokenizer.model_max_length,), -1)
    for j, name in enumerate(names):
        owner[trigger_positions(cp.pipe.tokenizer, prompt, rt.adapters[name].metadata.trigger_words)] = j

    elsewhere = [(owner >= 0) & (owner != j) for j in range(len(names))]  # tokens another LoRA owns

    def hook_for(key):
        deltas = [dense_delta(rt.adapters[n].deltas[key]) if key in rt.adapters[n].deltas else None for n in names]

        def hook(module, args, output):
            x, half = args[0], args[0].shape[0] // 2
            out = output.clone()
            for d, at in zip(deltas, elsewhere):
                if d is not None and bool(at.any()):
                    out[half:, at] -= x[half:, at] @ d.to(x.dtype).T
            return out

        return hook

    handles = [layer.module.register_forward_hook(hook_for(key)) for key, layer in rt.layers.items()
               if key.endswith(KV)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class OwnInputs(Strategy):
    """Row group 0 is the composed picture (no LoRA of its own: :func:`own_inputs` adds the others' deltas to
    it); group ``1 + i`` runs LoRA ``i`` alone. Only group 0's prediction is used."""

    name = "own-inputs"

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        n = len(self.adapters)
        weights = torch.cat([torch.zeros(1, n), torch.diag(self.user_weights)])
        return StepPlan(weights, combine=torch.cat([torch.ones(1), torch.zeros(n)]))


@contextlib.contextmanager
def own_inputs(runtime, n: int):
    """With :class:`OwnInputs`' ``n + 1`` row groups in one pass: in every UNet layer holding LoRAs, the
    composed rows get the sum of the solo rows' deltas (each computed on its own row's input)."""

    def hook(module, args, output):
        if output.shape[0] % (n + 1):
            return output
        x, rows = args[0], output.shape[0] // (n + 1)
        base = (module._conv_forward(x, module.weight, module.bias) if isinstance(module, torch.nn.Conv2d)
                else torch.nn.functional.linear(x, module.weight, module.bias))
        delta = (output - base)[rows:]
        out = output.clone()
        out[:rows] += delta.reshape(n, rows, *delta.shape[1:]).sum(0)
        return out

    handles = [layer.module.register_forward_hook(hook) for key, layer in runtime.layers.items()
               if key.startswith("unet.")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_probe(ev: Evaluator, detector, probe: str, sizes=(3, 4), seed: int = 1000) -> dict:
    """Merge on every combination of ``sizes`` with ``probe`` applied; one picture each (``compose eval``'s
    protocol with ``--seeds 1``). Returns the tally's summary plus the commonest misses (wanted -> drawn)."""
    kind, _, value = probe.partition("=")
    cp, tally, misses = ev.pipe, Tally(), collections.Counter()
    order = {c.name: list(c.values) for c in world.CATEGORIES}
    guidance = ev.guidance
    rng, t0 = np.random.default_rng(seed), time.perf_counter()
    try:
        for i, combo in enumerate(combinations(sizes)):
            scene = scene_for(combo, rng)
            wanted = {s.category: s.value for s in combo}
            base = {c: getattr(scene, c) for c in BASE_CATEGORIES if c not in wanted}
            prompt, names = world.caption(scene), [s.name for s in combo]
            loras = [(n, float(value) if kind == "weight" else 1.0) for n in names]
            for name in names:  # attached before the render, so the probe can see them
                cp.load_lora(name)
            ev.guidance = float(value) if kind == "guidance" else guidance
            with (uncond_factor(cp.runtime, float(value)) if kind == "uncond" else
                  text_splice(cp, names) if kind == "text-splice" else
                  kv_route(cp, names, prompt) if kind == "kv-route" else
                  own_inputs(cp.runtime, len(names)) if kind == "own-inputs" else contextlib.nullcontext()):
                strategy = OwnInputs() if kind == "own-inputs" else "merge"
                images = ev.run(prompt, loras, strategy, seed + i, tally, wanted, base)
            probs = detector.probs(images)
            for c, v in wanted.items():
                drawn = order[c][int(probs[c][0].argmax())]
                if drawn != v:
                    misses[f"{v}->{drawn}"] += 1
    finally:
        ev.guidance = guidance
    out = tally.summary()
    out.update(probe=probe, misses=dict(misses.most_common(6)), seconds=round(time.perf_counter() - t0, 1))
    return out


PROBES = ("merge", "weight", "guidance", "uncond", "text-splice", "kv-route", "own-inputs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_composer.miniworld.probes", description=__doc__.splitlines()[0])
    p.add_argument("probes", nargs="+", help="merge, weight=W, guidance=G, uncond=F, text-splice, kv-route, own-inputs")
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 4])
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for probe in args.probes:
        kind, eq, value = probe.partition("=")
        if kind not in PROBES or (kind in ("weight", "guidance", "uncond")) != bool(eq):
            p.error(f"unknown probe {probe!r}: one of merge, weight=W, guidance=G, uncond=F, text-splice, kv-route, own-inputs")
        try:
            float(value or 0)
        except ValueError:
            p.error(f"probe {probe!r}: {value!r} is not a number")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lora_composer.miniworld.detectors import load_detector
    from lora_composer.pipeline import ComposerPipeline

    cp = ComposerPipeline.from_pretrained(assets.model_dir(), library=assets.library_dir())
    detector = load_detector(assets.detector_path())
    ev = Evaluator(cp, detector, steps=20, guidance=assets.DEFAULT_GUIDANCE, seeds=1)
    print("| probe | " + " | ".join(f"all, {k} LoRAs" for k in args.sizes) + " | per concept | base-concept confidence | commonest misses |")
    print("|---|" + "---|" * (len(args.sizes) + 3))
    for probe in args.probes:
        r = run_probe(ev, detector, probe, tuple(args.sizes), args.seed)
        sizes = " | ".join(f"{r['by_size'].get(k, 0):.3f}" for k in args.sizes)
        misses = ", ".join(f"{k} {n}" for k, n in r["misses"].items())
        print(f"| {probe} | {sizes} | {r['per_concept']:.3f} | {r['base_confidence']:.3f} | {misses} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
