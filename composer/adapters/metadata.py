"""What a LoRA says about itself: trigger words, description, preferred weight.

Sources, merged in this order (duplicates dropped, first spelling kept):
1. a sidecar next to the file: ``NAME.json`` (AUTOMATIC1111's user metadata: ``"activation text"``,
   ``"description"``, ``"preferred weight"``) and ``NAME.civitai.info`` (Civitai's API answer:
   ``trainedWords``, ``description``);
2. the safetensors header: ``modelspec.trigger_phrase`` (comma separated), ``modelspec.description``;
3. kohya's ``ss_tag_frequency`` (``{dataset: {tag: count}}``): the most frequent tags.

``ss_output_name`` is the name the trainer gave the output, not something a prompt should contain,
so it is not a trigger word.
"""

from __future__ import annotations

import collections
import json
import warnings
from pathlib import Path

TOP_TAGS = 5
PREFERRED_WEIGHT_KEY = "lora_composer.preferred_weight"


def split_words(text) -> list[str]:
    """``"a, b ,c"`` or ``["a, b", "c"]`` -> ``["a", "b", "c"]`` (empty parts dropped)."""
    if text is None:
        return []
    items = text if isinstance(text, (list, tuple)) else [text]
    out = []
    for item in items:
        if not isinstance(item, str):
            continue
        out.extend(part.strip() for part in item.split(",") if part.strip())
    return out


def merge_unique(*lists) -> list[str]:
    seen, out = set(), []
    for words in lists:
        for w in words:
            key = w.strip().lower()
            if key and key not in seen:
                seen.add(key)
                out.append(w.strip())
    return out


def tags_from_frequency(raw: str | None, top: int = TOP_TAGS, min_share: float = 0.5) -> list[str]:
    """Most frequent tags of kohya's ``ss_tag_frequency`` (counts summed over datasets, ties keep file order).

    Only tags seen at least ``min_share`` times as often as the most frequent one: a trigger word captions
    (nearly) every training image, descriptive tags ("red", "smiley face") only some, and taking those as
    triggers would make a style LoRA answer every prompt that says "red".
    """
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    counts: collections.Counter = collections.Counter()
    order: dict[str, int] = {}
    spelling: dict[str, str] = {}
    for dataset in data.values():
        if not isinstance(dataset, dict):
            continue
        for tag, count in dataset.items():
            tag = str(tag).strip()
            if not tag:
                continue
            key = tag.lower()
            try:
                counts[key] += int(count)
            except (TypeError, ValueError):
                continue
            order.setdefault(key, len(order))
            spelling.setdefault(key, tag)
    ranked = sorted(counts, key=lambda k: (-counts[k], order[k]))
    floor = counts[ranked[0]] * min_share if ranked else 0
    return [spelling[k] for k in ranked[:top] if counts[k] >= floor]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: ignoring unreadable sidecar ({e})", stacklevel=3)
        return {}
    if not isinstance(data, dict):
        warnings.warn(f"{path}: ignoring sidecar that is not a JSON object", stacklevel=3)
        return {}
    return data


def sidecar_paths(path: Path) -> list[Path]:
    """Existing sidecars of a LoRA file, A1111's ``NAME.json`` first."""
    base = path.with_suffix("")
    candidates = [base.with_name(base.name + ".json"), base.with_name(base.name + ".civitai.info")]
    return [p for p in candidates if p.is_file() and p != path]


def _weight(value) -> float | None:
    try:
        w = float(value)
    except (TypeError, ValueError):
        return None
    # A1111 writes 0 for "not set".
    return w if w != 0 else None


def read_sidecars(path: Path) -> dict:
    """``{"trigger_words": [...], "description": str, "preferred_weight": float | None}`` from sidecars."""
    words: list[list[str]] = []
    description = ""
    weight = None
    for sidecar in sidecar_paths(path):
        data = _read_json(sidecar)
        words.append(split_words(data.get("activation text")))
        words.append(split_words(data.get("trainedWords")))
        if not description:
            for key in ("description", "notes"):
                if isinstance(data.get(key), str) and data[key].strip():
                    description = data[key].strip()
                    break
        if weight is None:
            weight = _weight(data.get("preferred weight", data.get("preferredWeight")))
    return {"trigger_words": merge_unique(*words), "description": description, "preferred_weight": weight}


def build_metadata(path: Path, header: dict[str, str]) -> dict:
    """Fields of :class:`AdapterMetadata` (except ``sha256``/``source_format``) for a file and its header."""
    side = read_sidecars(path)
    trigger_words = merge_unique(
        side["trigger_words"],
        split_words(header.get("modelspec.trigger_phrase")),
        tags_from_frequency(header.get("ss_tag_frequency")),
    )
    description = side["description"] or (header.get("modelspec.description") or "").strip()
    weight = side["preferred_weight"]
    if weight is None:
        weight = _weight(header.get(PREFERRED_WEIGHT_KEY))
    return {
        "trigger_words": trigger_words,
        "description": description,
        "preferred_weight": weight,
        "file_metadata": dict(header),
    }
