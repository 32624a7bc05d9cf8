"""A fine-tuned text encoder shipped as a change to the one-object model's (two-object and community worlds).

The file holds every layer but the token embedding, and of that only the rows that moved: the 9.5 MB
embedding stays the shipped model's, so a world's text encoder costs a fraction of a megabyte.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_LAYERS = "text_encoder_layers.safetensors"  # the file's name in a world's weights folder
TOKEN_EMBEDDING = "token_embedding.weight"  # (name suffix) only the rows the captions use are shipped
ROW_IDS, ROWS = "token_rows.ids", "token_rows.weight"


def text_layers_file(trained, shipped, min_change: float = 0.05) -> dict[str, torch.Tensor]:
    """fp16 tensors of a fine-tuned text encoder: every layer but the token embedding, and of that only the
    rows that moved (the captions' tokens; the others only felt weight decay, under 1%, and stay shipped)."""
    out = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in trained.state_dict().items()
        if not k.endswith(TOKEN_EMBEDDING)
    }
    new, old = trained.get_input_embeddings().weight.detach(), shipped.get_input_embeddings().weight.detach()
    ids = torch.nonzero((new - old).norm(dim=1) > min_change * old.norm(dim=1)).flatten()
    out[ROW_IDS], out[ROWS] = ids.to(torch.int32), new[ids].to(torch.float16).contiguous()
    return out


def apply_text_layers(text_encoder, layers: Path) -> None:
    """Put a :func:`text_layers_file` into the one-object model's text encoder (nothing if there is none)."""
    if not layers.is_file():
        return
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(layers)).items()}
    ids, rows = state.pop(ROW_IDS).long(), state.pop(ROWS)
    missing, unexpected = text_encoder.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith((TOKEN_EMBEDDING, "position_ids")) for k in missing):
        raise ValueError(f"{layers}: not this text encoder's layers")
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids] = rows
