"""The mini world's training and research code: what builds its shipped weights and probes its results."""
