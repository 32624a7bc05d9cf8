"""Benchmarks of the runtime against its diffusers/PEFT reference, run side by side in one process.

``python -m bench`` runs them all; ``python -m bench.switch_weights`` / ``python -m bench.fuse_cycles``
run one. ``--tiny`` is a smoke run on the tiny SD1.5-shaped pipeline, ``--no-write`` leaves
``docs/BENCHMARKS.md`` alone. Results land in that file, one marked section per benchmark.
"""
