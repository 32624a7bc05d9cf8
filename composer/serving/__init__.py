"""``compose serve``: many users and many LoRAs on one model (HTTP API, step-level batching, adapter residency).

FastAPI is imported by :mod:`lora_composer.serving.app` only; the batcher works without it.
"""
