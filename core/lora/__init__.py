"""LoRA layers: named adapters on the frozen base, per-row routing, the variants (plain, DoRA, PiSSA/OLoRA)."""
