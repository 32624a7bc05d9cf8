"""Multi-adapter runtime: stacked factors inside the denoiser and text encoders, driven by mixing tensors."""

from lora_composer.runtime.mixing import MixingState
from lora_composer.runtime.runtime import LoraRuntime, pipeline_family

__all__ = ["LoraRuntime", "MixingState", "pipeline_family"]
