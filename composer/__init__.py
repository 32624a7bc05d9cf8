"""lora-composer: compose many LoRA adapters inside diffusers text-to-image pipelines."""
