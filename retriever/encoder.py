"""Prompt and description text through the base pipeline's own text encoder(s).

Every text signal works on the *token states the denoiser receives* (``pipe.encode_prompt``: CLIP's last
hidden states for SD1.5, both encoders' penultimate states side by side for SDXL), so no extra model is
needed and the weight signal sees exactly the space the cross-attention key/value deltas act on.

Raw CLIP states share a large common component, much of it set by the token's position (every token
looks alike under cosine), so a token state at position ``p`` is centred on the mean state at that position
over a fixed set of ordinary prompts (:data:`REFERENCE_PROMPTS` and comma-joined runs of them, which fill
all 77 positions) and normalised: ``e_hat = (e - mu_p) / ||e - mu_p||``. BOS, EOS and padding positions
are dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lora_composer.vocab import pipeline_family

# Ordinary prompts (subjects, styles, scenes) whose mean token state is the centre of the space.
REFERENCE_PROMPTS = (
    "a photo of a cat",
    "a portrait of a woman",
    "a landscape with mountains",
    "an old man smiling",
    "a red car on a street",
    "a bowl of fruit on a table",
    "a city at night",
    "a dog running on the beach",
    "an oil painting of a ship",
    "a watercolor of flowers",
    "a cartoon character",
    "a futuristic robot",
    "a forest in autumn",
    "a house by a lake",
    "a close-up of an eye",
    "a plate of food",
    "a girl with long hair",
    "a knight in armor",
    "a medieval castle",
    "a dragon flying",
    "anime style illustration",
    "pixel art",
    "a pencil sketch",
    "a 3d render of a chair",
    "a snowy village",
    "a desert at sunset",
    "an astronaut in space",
    "a bird on a branch",
    "a cup of coffee",
    "a man in a suit",
    "a beautiful sunset over the ocean",
    "a child playing",
    "a fantasy creature",
    "a cyberpunk street",
    "a vintage photograph",
    "a bright colorful poster",
    "a black and white photo",
    "a cozy bedroom interior",
    "a mountain lake reflection",
    "a busy market",
)


def reference_texts() -> list[str]:
    """The reference prompts, then 40 comma-joined runs of 10 of them (deterministic) for late positions."""
    refs = list(REFERENCE_PROMPTS)
    runs = [", ".join(refs[(7 * i + 3 * j) % len(refs)] for j in range(10)) for i in range(40)]
    return refs + runs


@dataclass
class Encoded:
    """One text: its content token states (centred, unit rows), their token strings, and the pooled vector."""

    tokens: torch.Tensor  # [T, d] centred and normalised; T may be 0
    words: list[str]

    @property
    def vector(self) -> torch.Tensor | None:
        """Unit mean of the token rows (the text-semantic embedding), or None for an empty text."""
        if self.tokens.shape[0] == 0:
            return None
        v = self.tokens.mean(0)
        n = v.norm()
        return v / n if n > 0 else None


def _fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for name, p in list(module.named_parameters())[:4]:
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 256)][:256].float().numpy().tobytes())
    return h.hexdigest()[:16]


class TextEncoder:
    """``encode(texts)`` -> :class:`Encoded` per text, with the pipeline's ``encode_prompt``."""

    def __init__(self, pipe, batch: int = 16):
        self.pipe = pipe
        self.family = pipeline_family(pipe)
        self.batch = batch
        self.tokenizer = pipe.tokenizer
        te = getattr(pipe, "text_encoder", None) or getattr(pipe, "text_encoder_2", None)
        parts = [type(pipe).__name__, self.family, _fingerprint(te) if te is not None else "none"]
        if getattr(pipe, "text_encoder_2", None) is not None:
            parts.append(_fingerprint(pipe.text_encoder_2))
        self.id = ":".join(parts)
        self._mean: torch.Tensor | None = None
        self.dim: int | None = None

    # -- raw states ------------------------------------------------------------------------------
    def _embeds(self, texts: list[str]) -> torch.Tensor:
        pipe = self.pipe
        device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
        with torch.no_grad():
            if getattr(pipe, "unet", None) is None and getattr(pipe, "text_encoder", None) is not None:
                return self._clip_states(texts, device)
            out = pipe.encode_prompt(
                prompt=texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        embeds = out[0]
        return embeds.detach().float().cpu()

    def _clip_states(self, texts: list[str], device) -> torch.Tensor:
        """A DiT pipeline's CLIP token states (FLUX's and SD3's prompt embeddings are T5's, or CLIP's padded and
        joined with T5's, whose tokens do not line up with the CLIP tokenizer the signals count words with)."""
        limit = getattr(self.tokenizer, "model_max_length", 77)
        ids = self.tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        ids = ids.input_ids
        return self.pipe.text_encoder(ids.to(device)).last_hidden_state.detach().float().cpu()

    def _lengths(self, texts: list[str]) -> list[int]:
        limit = getattr(self.tokenizer, "model_max_length", 77)
        ids = self.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        return [max(0, len(x) - 2) for x in ids], ids

    def raw(self, texts: list[str]) -> list[tuple[torch.Tensor, list[str]]]:
        """Uncentred content token states ``[T, d]`` and token strings per text."""
        out = []
        for i in range(0, len(texts), self.batch):
            chunk = [t if t.strip() else "" for t in texts[i : i + self.batch]]
            embeds = self._embeds(chunk)
            self.dim = int(embeds.shape[-1])
            lengths, ids = self._lengths(chunk)
            for j, n in enumerate(lengths):
                words = [self.tokenizer.decode([t]).strip() for t in ids[j][1 : 1 + n]]
                out.append((embeds[j, 1 : 1 + n], words))
        return out

    # -- centred ---------------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """Mean state per position ``[positions, d]`` over the reference prompts."""
        if self._mean is None:
            texts = reference_texts()
            sums, count = None, 0
            for i in range(0, len(texts), self.batch):
                e = self._embeds(texts[i : i + self.batch])
                sums = e.sum(0) if sums is None else sums + e.sum(0)
                count += e.shape[0]
            self._mean = sums / count
            self.dim = int(self._mean.shape[-1])
        return self._mean

    def set_mean(self, mean: torch.Tensor) -> None:
        self._mean = mean.float()
        self.dim = int(mean.shape[-1])

    def encode(self, texts: list[str]) -> list[Encoded]:
        mu = self.mean
        out = []
        for states, words in self.raw(texts):
            x = states - mu[1 : 1 + states.shape[0]]
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out.append(Encoded(x, words))
        return out

    def encode_one(self, text: str) -> Encoded:
        return self.encode([text])[0]
