"""LoRA layers: named adapters on the frozen base, per-row routing, merge and unmerge."""
