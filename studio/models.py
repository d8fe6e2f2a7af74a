"""Base-model availability (without blocking on the network) and loading with progress."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from core.api import HUB_IDS, PRESETS, hub_reachable

CHOICES = list(PRESETS)  # gpt2 .. gpt2-xl, then tiny
# Size of each model.safetensors on the hub (what a first use downloads).
DOWNLOAD_MB = {"gpt2": 548, "gpt2-medium": 1520, "gpt2-large": 3250, "gpt2-xl": 6430}
OFFLINE_FIX = ("connect once to fill the Hugging Face cache, or start with `--weights PATH` "
               "(a folder with model.safetensors + config.json), or use the `tiny` model")
TINY_NOTE = ("`tiny` has random weights (2 layers, width 64): always available offline, but its "
             "text is noise until you train it.")


class HubProbe:
    """Whether the hub answers, checked once in a background thread (never blocks the UI)."""

    def __init__(self, timeout: float = 3.0):
        self.timeout = timeout
        self.result: bool | None = None  # None: not known yet
        self._started = False
        self._lock = threading.Lock()

    def reachable(self) -> bool | None:
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            return False
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._check, name="hub-probe", daemon=True).start()
        return self.result

    def _check(self) -> None:
        self.result = hub_reachable(self.timeout)


def cached_weights(name: str) -> str | None:
    """The cached model.safetensors of a preset, or None (a local cache lookup only)."""
    repo = HUB_IDS.get(name)
    if repo is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(repo, "model.safetensors")
        config = try_to_load_from_cache(repo, "config.json")
    except Exception:  # noqa: BLE001 - an unreadable cache is the same as an empty one
        return None
    return found if isinstance(found, str) and isinstance(config, str) else None


def availability(name: str, weights: str | None = None, weights_for: str | None = None,
                 probe: HubProbe | None = None) -> tuple[str, str]:
    """(kind, markdown): kind is 'available', 'download' or 'missing'."""
    if name == "tiny":
        return "available", f"**available** (built in). {TINY_NOTE}"
    if name not in PRESETS:
        return "missing", f"**unknown model** `{name}`; choose one of {', '.join(CHOICES)}."
    if weights and name == weights_for:
        if Path(weights).expanduser().exists():
            return "available", f"**available** (local weights: `{weights}`)"
        return "missing", f"**not available**: `--weights {weights}` does not exist; fix the path."
    if cached_weights(name):
        return "available", "**available (cached)** in the Hugging Face cache"
    size = DOWNLOAD_MB[name]
    size_txt = f"~{size / 1000:.1f} GB" if size >= 1000 else f"~{size} MB"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    reachable = False if offline else probe.reachable() if probe is not None else None
    if reachable is False:
        offline = " (HF_HUB_OFFLINE is set)" if offline else ""
        return "missing", f"**not available offline**{offline}: the hub cannot be reached. To fix: {OFFLINE_FIX}."
    checking = " (checking the hub…)" if reachable is None else ""
    return "download", f"**will download ({size_txt}) on first use**{checking}"


def describe(name: str) -> str:
    cfg = PRESETS.get(name)
    if cfg is None:
        return ""
    return f"{cfg.n_layer} layers · width {cfg.n_embd} · {cfg.n_params() / 1e6:,.1f}M parameters"
