"""What the web UI shows and reads, without Gradio: the weights heatmap and the Auto table as HTML, the
``<lora:...>`` tags of a prompt kept in step with the LoRA rows, and A1111 ``parameters`` text read back.

Everything here is plain functions over plain data, so :mod:`lora_composer.frontends.ui` stays the wiring.
"""

from __future__ import annotations

import html
import re

from lora_composer.prompt_syntax import format_lora_tag, has_regions, parse_prompt, tidy_prompt

DEFAULT_SLOT_WEIGHT = 0.8  # a new LoRA row's weights

# -- LoRA rows <-> prompt tags -------------------------------------------------------------------------
_TAG_RE = re.compile(r"<(?:lora|lyco):[^<>]*>", re.IGNORECASE)


def new_slot(name: str = "", te: float = DEFAULT_SLOT_WEIGHT, unet: float = DEFAULT_SLOT_WEIGHT) -> dict:
    return {"name": name, "te": float(te), "unet": float(unet)}


def strip_tags(prompt: str) -> str:
    """``prompt`` without its ``<lora:...>`` tags (spaces and commas tidied)."""
    text = _TAG_RE.sub(" ", prompt or "")
    text = re.sub(r"\s+,", ",", re.sub(r"[ \t]+", " ", text))
    return re.sub(r"(,\s*)+$", "", text).strip()


def tag_name(name: str) -> str:
    """The name a tag uses for a library file: ``star-shape`` for ``star-shape.safetensors``."""
    from lora_composer.library import lora_stem

    return lora_stem(name)


def prompt_with_slots(prompt: str, slots: list[dict]) -> str:
    """The prompt's text with one tag per named row, in the rows' order (the rows are the truth).

    A regional prompt (``BREAK``) keeps its tags where they stand, since there a tag's place says which region it
    acts in: a row's tags get its weights in place, tags without a row go, rows without a tag are added at the end.
    """
    rows = {tag_name(s["name"]).lower(): s for s in slots if s.get("name")}
    if not has_regions(prompt or ""):
        tags = [format_lora_tag(tag_name(s["name"]), s["te"], s["unet"]) for s in rows.values()]
        return " ".join(p for p in [strip_tags(prompt), *tags] if p)
    placed = set()

    def update(match: re.Match) -> str:
        key = tag_name(match.group(0)[1:-1].split(":")[1].strip()).lower()
        if key not in rows:
            return " "
        placed.add(key)
        return format_lora_tag(tag_name(rows[key]["name"]), rows[key]["te"], rows[key]["unet"])

    text = tidy_prompt(_TAG_RE.sub(update, prompt))
    tags = [format_lora_tag(tag_name(s["name"]), s["te"], s["unet"]) for k, s in rows.items() if k not in placed]
    return " ".join(p for p in [text, *tags] if p)


def slots_from_prompt(prompt: str, resolve) -> list[dict] | None:
    """The rows the prompt's tags describe (``resolve``: tag name -> library name, or the name unchanged
    when it is not in the library), or None while the prompt cannot be read (an unclosed tag being typed)."""
    try:
        _, refs = parse_prompt(prompt or "")
    except Exception:
        return None
    out: dict[str, dict] = {}
    for r in refs:  # one row per file: the last tag wins, as in the render
        name = resolve(r.name)
        out.pop(name, None)
        out[name] = new_slot(name, r.te_weight, r.unet_weight)
    return list(out.values())


# -- the weights heatmap -----------------------------------------------------------------------------
_STOPS = [
    (0.0, (0, 0, 4)),
    (0.25, (81, 18, 124)),
    (0.5, (183, 55, 121)),
    (0.75, (252, 137, 97)),
    (1.0, (252, 253, 191)),
]


def _colour(x: float) -> str:
    """magma-like colour for ``x`` in [0, 1]."""
    x = min(1.0, max(0.0, x))
    for (a, ca), (b, cb) in zip(_STOPS, _STOPS[1:]):
        if x <= b:
            t = (x - a) / (b - a)
            return "rgb({},{},{})".format(*(round(p + (q - p) * t) for p, q in zip(ca, cb)))
    return "rgb(252,253,191)"


def heatmap_html(weights, adapters: list[str], title: str) -> str:
    """A steps x adapters grid (``weights``: ``[steps][adapters]``) as HTML: adapter names as row labels,
    step numbers (every few, and always the last) as column labels; the value of a cell on hover."""
    rows = [list(map(float, r)) for r in weights]
    steps = len(rows)
    head = f'<div class="heat-title">{html.escape(title)}</div>'
    if not steps or not adapters:
        return f'<div class="heat">{head}<div class="heat-empty">no LoRA in use</div></div>'
    flat = [v for r in rows for v in r]
    low, high = min(0.0, min(flat)), max(max(flat), 1e-6)
    every = max(1, -(-steps // 12))
    labels = "".join(
        f'<div class="heat-step">{i + 1 if (i + 1) % every == 0 or i == 0 or i == steps - 1 else ""}</div>'
        for i in range(steps)
    )
    body = []
    for j, name in enumerate(adapters):
        cells = "".join(
            f'<div class="heat-cell" style="background:{_colour((rows[i][j] - low) / (high - low))}" '
            f'title="{html.escape(name)}, step {i + 1}: {rows[i][j]:.3f}"></div>'
            for i in range(steps)
        )
        body.append(f'<div class="heat-name">{html.escape(name)}</div>{cells}')
    grid = (
        f'<div class="heat-grid" style="grid-template-columns: max-content repeat({steps}, minmax(2px, 1fr))">'
        f'<div class="heat-corner">step</div>{labels}{"".join(body)}</div>'
    )
    legend = (
        f'<div class="heat-legend"><span>{low:g}</span><span class="heat-bar" style="background:linear-gradient('
        f'to right,{",".join(_colour(x) for x, _ in _STOPS)})"></span><span>{high:.3g}</span>'
        f'<span class="heat-note">weight applied, {steps} steps</span></div>'
    )
    return f'<div class="heat">{head}{grid}{legend}</div>'


# -- the Auto table --------------------------------------------------------------------------------
def auto_html(picks: list[dict], left_out: list[dict], notice: str | None) -> str:
    """The retriever's choice: each pick with the prompt span it covers and why; then what was left out."""
    e = html.escape
    if not picks:
        out = ['<p class="auto-none">No LoRA in the library matched the prompt.</p>']
    else:
        rows = "".join(
            f'<tr><td class="auto-name">{e(tag_name(p["name"]))}</td><td class="auto-num">{p["weight"]:g}</td><td>&ldquo;{e(p.get("span") or "")}&rdquo;</td>'
            f"<td>{e(p['reason'])}</td></tr>"
            for p in picks
        )
        out = [
            '<table class="auto-table"><thead><tr><th>picked</th><th>weight</th><th>covers</th><th>why</th></tr>'
            f"</thead><tbody>{rows}</tbody></table>"
        ]
    if notice:
        out.append(f'<p class="auto-notice">{e(notice)}</p>')
    if left_out:
        rows = "".join(
            f'<tr><td class="auto-name">{e(tag_name(m["name"]))}</td><td>{e(m["why"])}</td></tr>' for m in left_out
        )
        out.append(
            '<details class="auto-left"><summary>left out ({})</summary><table class="auto-table">'
            "<thead><tr><th>LoRA</th><th>why not</th></tr></thead><tbody>{}</tbody></table></details>".format(
                len(left_out), rows
            )
        )
    return '<div class="auto">' + "".join(out) + "</div>"


# -- A1111 parameters --------------------------------------------------------------------------------
# A1111's own pattern for the settings line (modules/infotext_utils.py).
_SETTING_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    """AUTOMATIC1111's ``parameters`` text -> ``{"prompt", "negative_prompt", **settings}`` (settings as
    written: ``Steps``, ``Sampler``, ``CFG scale``, ``Seed``, ``Size``...)."""
    import json

    lines = (text or "").strip().split("\n")
    settings_line = lines[-1] if len(lines) > 0 and len(_SETTING_RE.findall(lines[-1])) >= 3 else ""
    if settings_line:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    for key, value in _SETTING_RE.findall(settings_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out
