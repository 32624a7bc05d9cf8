"""Textual-inversion embeddings bundled in a LoRA file, as AUTOMATIC1111 reads them.

A1111 writes and reads ``bundle_emb.NAME.string_to_param.*`` (one text encoder: ``[vectors, width]``) and
``bundle_emb.NAME.clip_l`` / ``bundle_emb.NAME.clip_g`` (SDXL's two text encoders). :func:`split_bundled` takes
them out of a file's tensors (``load_adapter`` keeps them on ``Adapter.embeddings``); :func:`attach_embeddings`
loads each as a textual inversion with diffusers' ``load_textual_inversion`` (the token ``NAME``, plus
``NAME_1`` ... for a multi-vector embedding, added to the tokenizer), and :func:`detach_embeddings` removes
exactly those tokens again (diffusers' ``unload_textual_inversion``), which is what unloading the LoRA does.
As in A1111, a bundled embedding whose name the tokenizer already knows is left out (the loaded one wins).
"""

from __future__ import annotations

import torch

from ..errors import ComposerError

PREFIX = "bundle_emb."
# A1111's vector names -> the pipeline's text encoder and tokenizer
_TARGETS = {
    "clip_l": ("text_encoder", "tokenizer"),
    "clip_g": ("text_encoder_2", "tokenizer_2"),
    "string_to_param": ("text_encoder", "tokenizer"),
}


class EmbeddingError(ComposerError, ValueError):
    """A bundled embedding that cannot be read or loaded; the message names it and the cause."""


def split_bundled(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``(the other tensors, {NAME: {text encoder component: [vectors, width]}})`` of a LoRA file's tensors."""
    rest, found = {}, {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            rest[key] = t
            continue
        _, name, vec = (key.split(".", 2) + ["", ""])[:3]
        target = _TARGETS.get(vec.split(".", 1)[0])
        if not name or target is None:
            raise EmbeddingError(
                f"unknown bundled embedding key {key!r} (expected bundle_emb.NAME.string_to_param.* "
                "or bundle_emb.NAME.clip_l / clip_g)"
            )
        if t.dim() not in (1, 2) or not t.is_floating_point() or t.numel() == 0:
            raise EmbeddingError(
                f"bundled embedding {key!r} is not a [vectors, width] float tensor (shape {tuple(t.shape)})"
            )
        if not torch.isfinite(t).all():
            raise EmbeddingError(f"bundled embedding {key!r} has NaN or inf values")
        comp = target[0]
        if comp in found.get(name, {}):
            raise EmbeddingError(f"bundled embedding {name!r} has two tensors for {comp} (key {key!r})")
        found.setdefault(name, {})[comp] = t.reshape(-1, t.shape[-1])
    return rest, found


def _token_ids(tokenizer) -> set[str]:
    return {t.content for t in tokenizer.added_tokens_decoder.values() if not t.special}


def attach_embeddings(pipe, embeddings: dict[str, dict[str, torch.Tensor]], where: str = "") -> dict[str, list[str]]:
    """Load bundled embeddings into ``pipe`` (a diffusers pipeline) as textual inversions; returns the tokens added
    per tokenizer component, what :func:`detach_embeddings` takes. All or nothing: a failure removes what it added."""
    if embeddings and not hasattr(pipe, "load_textual_inversion"):
        raise EmbeddingError(
            f"{where or 'LoRA'}: bundled embeddings need a pipeline with textual inversion "
            f"({type(pipe).__name__} has none)"
        )
    added: dict[str, list[str]] = {}
    try:
        for name, parts in embeddings.items():
            for comp, vec in parts.items():
                text_encoder, tok_name = comp, _TARGETS["clip_g" if comp == "text_encoder_2" else "clip_l"][1]
                tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, text_encoder, None)
                if tokenizer is None or encoder is None:
                    raise EmbeddingError(
                        f"{where}: bundled embedding {name!r} is for {text_encoder}, which the pipeline does not have"
                    )
                width = encoder.get_input_embeddings().weight.shape[1]
                if vec.shape[-1] != width:
                    raise EmbeddingError(
                        f"{where}: bundled embedding {name!r} is {vec.shape[-1]} wide, {text_encoder}'s "
                        f"token embeddings are {width} wide"
                    )
                if name in tokenizer.get_vocab():
                    continue  # A1111: an embedding of that name already loaded wins
                before = _token_ids(tokenizer)
                pipe.load_textual_inversion(
                    vec.to(encoder.dtype), token=name, tokenizer=tokenizer, text_encoder=encoder
                )
                added.setdefault(text_encoder, []).extend(sorted(_token_ids(tokenizer) - before))
    except Exception as e:
        detach_embeddings(pipe, added)
        if isinstance(e, EmbeddingError):
            raise
        raise EmbeddingError(f"{where}: cannot load bundled embeddings: {e}".splitlines()[0]) from None
    return added


def detach_embeddings(pipe, added: dict[str, list[str]]) -> None:
    """Remove the tokens :func:`attach_embeddings` added (their tokenizer entries and embedding rows)."""
    for text_encoder, tokens in added.items():
        if tokens:
            tok_name = "tokenizer_2" if text_encoder == "text_encoder_2" else "tokenizer"
            pipe.unload_textual_inversion(
                tokens=list(tokens), tokenizer=getattr(pipe, tok_name), text_encoder=getattr(pipe, text_encoder)
            )
