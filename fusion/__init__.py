"""Fusion strategies: how much of each adapter acts, per step, per layer group and per batch row."""
