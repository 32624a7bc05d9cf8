"""Smoke run of ``bench.strategies`` on the tiny pipeline: it runs, its three tables have the expected
rows, composite equals its sequential reference, CMLoRA's cache computes fewer rows. No timing assertions."""

from bench import strategies


def test_strategies_tiny():
    report = strategies.main(["--tiny", "--no-write"])
    parts = report.parts
    assert list(parts) == ["composite", "cmlora", "overhead"]
    for part, columns in (
        (parts["composite"], strategies.COMPOSITE_COLUMNS),
        (parts["cmlora"], strategies.CMLORA_COLUMNS),
        (parts["overhead"], strategies.OVERHEAD_COLUMNS),
    ):
        assert part.columns == columns
        for row in part.rows:
            assert set(columns) <= set(row)

    composite = parts["composite"].rows
    assert [r["adapters"] for r in composite] == [2, 3, 5]
    for r in composite:
        assert r["equal output"] is True and r["max abs latent diff"] <= 1e-4
        steps = r["steps"]
        assert r["ours passes"] == steps  # one batched pass per step
        assert r["reference passes"] == steps * r["adapters"]  # one pass per adapter per step
        assert r["ours rows"] == r["reference rows"] == steps * 2 * r["adapters"]
        assert r["ours denoiser per image (s)"] > 0 and r["reference denoiser per image (s)"] > 0

    cm = {r["strategy"]: r for r in parts["cmlora"].rows}
    assert list(cm) == ["composite", "cmlora (cache)", "cmlora (no cache)"]
    assert cm["cmlora (cache)"]["rows computed"] < cm["composite"]["rows computed"]
    assert cm["cmlora (no cache)"]["rows computed"] == cm["composite"]["rows computed"]
    assert cm["composite"]["max abs latent diff vs composite"] == 0
    assert cm["cmlora (no cache)"]["max abs latent diff vs cmlora without cache"] == 0

    overhead = parts["overhead"].rows
    assert [r["strategy"] for r in overhead] == ["merge", "switch (every=1)", "gated"]
    for r in overhead:
        assert r["UNet forward per step (ms)"] > 0 and r["overhead per step (ms)"] >= 0
        assert r["replayed plan + write + refresh (ms)"] > 0 and r["end-to-end per image (s)"] > 0

    md = report.markdown()
    assert "<!--" not in md and md.count("\n### ") == 3
    assert "Command: `python -m bench.strategies --tiny --no-write`" in md
    assert "No GPU in this run" in md and "torch threads" in md
    for columns in (strategies.COMPOSITE_COLUMNS, strategies.CMLORA_COLUMNS, strategies.OVERHEAD_COLUMNS):
        assert "| " + " | ".join(columns) + " |" in md
