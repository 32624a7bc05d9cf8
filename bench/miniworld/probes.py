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

One probe changes nothing and measures instead (merge's own pictures, with ``2 N + 1`` row groups computed beside):

- ``effects``: per LoRA, how hard it pushes inside the stack against alone (the energy of its deltas in every
  UNet layer, on the stack's features / on its own), and how much it still moves the guided prediction (``|e_all -
  e_{all without i}| / |e_i - e_base|``), for concepts drawn and concepts missed: is a missed concept's push
  weakened inside the stack, or cancelled after it?

    python -m bench.miniworld.probes [--sizes 3 4] [--seed 1000] [--threads 2] merge weight=0.8 kv-route
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
        out += [p for s in range(len(ids) - len(w) + 1) if ids[s : s + len(w)] == w for p in range(s, s + len(w))]
    return out


@contextlib.contextmanager
def forward_hooks(runtime, keys, hook_for):
    """``hook_for(key, module)``'s forward hook on each of the runtime's layers ``keys``, removed on exit."""
    handles = [
        runtime.layers[key].module.register_forward_hook(hook_for(key, runtime.layers[key].module)) for key in keys
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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


def kv_route(cp, names: list[str], prompt: str):
    """At LoRA j's trigger tokens the other LoRAs' cross-attention K/V deltas are taken back out
    (conditional half only; the unconditional prompt has no trigger words)."""
    from lora_composer.adapters.shira import dense_delta

    rt = cp.runtime
    owner = torch.full((cp.pipe.tokenizer.model_max_length,), -1)
    for j, name in enumerate(names):
        owner[trigger_positions(cp.pipe.tokenizer, prompt, rt.adapters[name].metadata.trigger_words)] = j

    elsewhere = [(owner >= 0) & (owner != j) for j in range(len(names))]  # tokens another LoRA owns

    def hook_for(key, module):
        deltas = [dense_delta(rt.adapters[n].deltas[key]) if key in rt.adapters[n].deltas else None for n in names]

        def hook(module, args, output):
            x, half = args[0], args[0].shape[0] // 2
            out = output.clone()
            for d, at in zip(deltas, elsewhere):
                if d is not None and bool(at.any()):
                    out[half:, at] -= x[half:, at] @ d.to(x.dtype).T
            return out

        return hook

    return forward_hooks(rt, [key for key in rt.layers if key.endswith(KV)], hook_for)


class OwnInputs(Strategy):
    """Row group 0 is the composed picture (no LoRA of its own: :func:`own_inputs` adds the others' deltas to
    it); group ``1 + i`` runs LoRA ``i`` alone. Only group 0's prediction is used."""

    name = "own-inputs"

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        n = len(self.adapters)
        weights = torch.cat([torch.zeros(1, n), torch.diag(self.user_weights)])
        return StepPlan(weights, combine=torch.cat([torch.ones(1), torch.zeros(n)]))


def own_inputs(runtime, n: int):
    """With :class:`OwnInputs`' ``n + 1`` row groups in one pass: in every UNet layer holding LoRAs, the
    composed rows get the sum of the solo rows' deltas (each computed on its own row's input)."""

    def hook(module, args, output):
        if output.shape[0] % (n + 1):
            return output
        x, rows = args[0], output.shape[0] // (n + 1)
        base = (
            module._conv_forward(x, module.weight, module.bias)
            if isinstance(module, torch.nn.Conv2d)
            else torch.nn.functional.linear(x, module.weight, module.bias)
        )
        delta = (output - base)[rows:]
        out = output.clone()
        out[:rows] += delta.reshape(n, rows, *delta.shape[1:]).sum(0)
        return out

    return forward_hooks(runtime, [key for key in runtime.layers if key.startswith("unet.")], lambda key, module: hook)


class Effects(Strategy):
    """Row group 0 is merge (its prediction is the only one used); then every adapter but ``i`` (``N`` groups),
    adapter ``i`` alone (``N``) and the base. Each step appends, per adapter, ``|g_all - g_{all without i}| /
    |g_i - g_base|`` on the guided predictions ``g`` (guidance ``scale``) to ``self.effect``."""

    name = "effects"

    def __init__(self, scale: float):
        self.scale = float(scale)

    def begin(self, adapters, weights, num_steps, context=None):
        super().begin(adapters, weights, num_steps, context)
        self.effect: list[list[float]] = []

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        n, w = len(self.adapters), self.user_weights
        weights = torch.cat([w[None], w.repeat(n, 1) * (1 - torch.eye(n)), torch.diag(w), torch.zeros(1, n)])
        return StepPlan(weights, combine=torch.cat([torch.ones(1), torch.zeros(2 * n + 1)]))

    def combine(self, predictions: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        g = predictions
        if self.context.cfg:
            uncond, cond = predictions.chunk(2, dim=1)
            g = uncond + self.scale * (cond - uncond)
        n = len(self.adapters)
        self.effect.append(
            [float((g[0] - g[1 + i]).norm() / (g[1 + n + i] - g[-1]).norm().clamp_min(1e-12)) for i in range(n)]
        )
        return predictions[0]


def pushes(runtime, names: list[str], energy: torch.Tensor):
    """With :class:`Effects`' row groups in one pass: adds, in every UNet layer, LoRA ``i``'s delta energy
    ``|delta_i(x)|^2`` on merge's rows to ``energy[i, 0]`` and on its solo rows to ``energy[i, 1]``."""
    from lora_composer.adapters.shira import dense_delta

    n = len(names)

    def hook_for(key, module):
        deltas = [
            (i, dense_delta(runtime.adapters[name].deltas[key]).reshape(module.weight.shape))
            for i, name in enumerate(names)
            if key in runtime.adapters[name].deltas
        ]
        apply = runtime.layers[key].apply_dense

        def hook(mod, args, output):
            x = args[0]
            if x.shape[0] % (2 * n + 2):
                return output
            rows = x.shape[0] // (2 * n + 2)
            for i, d in deltas:
                energy[i, 0] += float(apply(x[:rows], d, None).pow(2).sum())
                energy[i, 1] += float(apply(x[(1 + n + i) * rows : (2 + n + i) * rows], d, None).pow(2).sum())
            return output

        return hook

    keys = [
        key
        for key in runtime.layers
        if key.startswith("unet.") and any(key in runtime.adapters[name].deltas for name in names)
    ]
    return forward_hooks(runtime, keys, hook_for)


def separation(drawn: list[float], missed: list[float]) -> float:
    """The chance that a drawn concept's figure exceeds a missed one's (ties count half; 0.5: no signal)."""
    if not drawn or not missed:
        return float("nan")
    d, m = np.asarray(drawn)[:, None], np.asarray(missed)[None]
    return float((d > m).mean() + 0.5 * (d == m).mean())


def run_probe(ev: Evaluator, detector, probe: str, sizes=(3, 4), seed: int = 1000) -> dict:
    """Merge on every combination of ``sizes`` with ``probe`` applied; one picture each (``compose eval``'s
    protocol with ``--seeds 1``). Returns the tally's summary plus the commonest misses (wanted -> drawn)."""
    kind, _, value = probe.partition("=")
    cp, tally, misses = ev.pipe, Tally(), collections.Counter()
    measured = {"push": ([], []), "effect": ([], [])}  # per concept: (drawn, missed)
    by_concept = collections.defaultdict(lambda: ([], []))  # effect per concept value: (drawn, missed)
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
            energy = torch.zeros(len(names), 2, dtype=torch.float64)
            with (
                uncond_factor(cp.runtime, float(value))
                if kind == "uncond"
                else text_splice(cp, names)
                if kind == "text-splice"
                else kv_route(cp, names, prompt)
                if kind == "kv-route"
                else own_inputs(cp.runtime, len(names))
                if kind == "own-inputs"
                else pushes(cp.runtime, names, energy)
                if kind == "effects"
                else contextlib.nullcontext()
            ):
                strategy = (
                    OwnInputs() if kind == "own-inputs" else Effects(ev.guidance) if kind == "effects" else "merge"
                )
                images = ev.run(prompt, loras, strategy, seed + i, tally, wanted, base)
            probs = detector.probs(images)
            for j, (c, v) in enumerate(wanted.items()):
                drawn = order[c][int(probs[c][0].argmax())]
                if drawn != v:
                    misses[f"{v}->{drawn}"] += 1
                if kind == "effects":
                    measured["push"][drawn != v].append(float(energy[j, 0] / energy[j, 1]))
                    measured["effect"][drawn != v].append(float(np.mean([e[j] for e in strategy.effect])))
                    by_concept[v][drawn != v].append(measured["effect"][drawn != v][-1])
    finally:
        ev.guidance = guidance
    out = tally.summary()
    out.update(probe=probe, misses=dict(misses.most_common(6)), seconds=round(time.perf_counter() - t0, 1))
    if kind == "effects":
        out["effects"] = {
            k: {
                "drawn": float(np.mean(d)) if d else None,
                "missed": float(np.mean(m)) if m else None,
                "concepts": (len(d), len(m)),
                "separation": separation(d, m),
            }
            for k, (d, m) in measured.items()
        }
        out["effect_by_concept"] = {
            v: (float(np.mean(d)) if d else None, float(np.mean(m)) if m else None, len(m))
            for v, (d, m) in sorted(by_concept.items())
        }
    return out


PROBES = ("merge", "weight", "guidance", "uncond", "text-splice", "kv-route", "own-inputs", "effects")
MEASURES = {
    "push": "push: its deltas' energy in the stack / alone",
    "effect": "effect: norm(e_all - e_{all without i}) / norm(e_i - e_base)",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.miniworld.probes", description=__doc__.splitlines()[0])
    p.add_argument(
        "probes", nargs="+", help="merge, weight=W, guidance=G, uncond=F, text-splice, kv-route, own-inputs, effects"
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 4])
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for probe in args.probes:
        kind, eq, value = probe.partition("=")
        if kind not in PROBES or (kind in ("weight", "guidance", "uncond")) != bool(eq):
            p.error(
                f"unknown probe {probe!r}: one of merge, weight=W, guidance=G, uncond=F, text-splice, kv-route, "
                "own-inputs, effects"
            )
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
    print(
        "| probe | "
        + " | ".join(f"all, {k} LoRAs" for k in args.sizes)
        + " | per concept | base-concept confidence | commonest misses |"
    )
    print("|---|" + "---|" * (len(args.sizes) + 3))
    results = []
    for probe in args.probes:
        r = run_probe(ev, detector, probe, tuple(args.sizes), args.seed)
        sizes = " | ".join(f"{r['by_size'].get(k, 0):.3f}" for k in args.sizes)
        misses = ", ".join(f"{k} {n}" for k, n in r["misses"].items())
        print(f"| {probe} | {sizes} | {r['per_concept']:.3f} | {r['base_confidence']:.3f} | {misses} |", flush=True)
        results.append(r)
    for r in results:
        if "effects" not in r:
            continue
        print("\n| each LoRA (effects) | drawn concepts | missed concepts | chance drawn > missed |\n|---|---|---|---|")
        for k, m in r["effects"].items():
            print(
                f"| {MEASURES[k]} | {m['drawn']:.3f} ({m['concepts'][0]}) | "
                f"{'-' if m['missed'] is None else format(m['missed'], '.3f')} ({m['concepts'][1]}) | {m['separation']:.2f} |"
            )
        print(
            "\neffect per concept, drawn / missed (times missed): "
            + ", ".join(
                f"{v} {'-' if d is None else format(d, '.2f')} / {'-' if m is None else format(m, '.2f')} ({k})"
                for v, (d, m, k) in r["effect_by_concept"].items()
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
