"""A small world with known ground truth: procedural pictures, a text-to-image model trained on them from
scratch, concept LoRAs it has never seen, and detectors that say which concepts an image shows.

It is the default model of ``compose`` (offline, meaningful pictures in a fraction of a second) and the
ground truth of ``compose eval``, which measures every composition strategy and the retriever on it.
"""
