"""Multi-adapter runtime: stacked factors inside the denoiser and text encoders, driven by mixing tensors."""

from composer.runtime.mixing import MixingState
from composer.runtime.runtime import LoraRuntime, pipeline_family

__all__ = ["LoraRuntime", "MixingState", "pipeline_family"]
