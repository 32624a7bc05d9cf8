"""ties: TIES-merging (Yadav et al. 2023) of the LoRAs' dense deltas, then merge's single pass.

Per layer: keep each LoRA's ``density`` largest-magnitude entries (trim), elect each entry's sign (the sign
of the trimmed deltas' sum, or the more frequent sign), and average, entry by entry, only the deltas that
agree with it (disjoint mean), each at its user weight: PEFT's ``merge_utils.ties``. Where LoRAs do not
overlap this is merge of the trimmed deltas; where they push an entry in opposite directions the minority
is dropped, and where they agree their mean replaces their sum.
"""

from __future__ import annotations

import torch

from lora_composer.fusion.task_arithmetic import RuleMerge, check_density, elect_and_share, top_magnitude_mask


class TiesStrategy(RuleMerge):
    name = "ties"
    suffix = "~ties"

    def __init__(self, density: float = 0.2, sign: str = "total", rank: int = 0):
        if sign not in ("total", "frequency"):
            raise ValueError(f"sign must be total or frequency, got {sign!r}")
        self.density = check_density(density)
        self.sign = sign
        if int(rank) < 0:
            raise ValueError(f"rank must be >= 0 (0: dense deltas), got {rank}")
        self.rank = int(rank)

    def rule(self, stack: torch.Tensor, names: list) -> torch.Tensor:
        trimmed = torch.stack([t * top_magnitude_mask(t, self.density) for t in stack]) if self.density < 1 else stack
        return elect_and_share(trimmed, self.sign)
