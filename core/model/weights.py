"""Loading GPT-2 weights: the tiny preset, the Hugging Face hub (cached), or local files.

HF stores the four projections as Conv1D, (in, out), and so do we. Checkpoints written with
nn.Linear orientation (out, in), as nanoGPT-style exports are, get transposed here, once; the
attention-mask buffers are dropped here too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from core import atomic
from core.model.config import ATTN_QKV, GPTConfig, HUB_IDS, PRESETS, TARGET_MODULES, target_shapes
from core.device import default_dtype, pick_device
from core.model.gpt import GPT, in_linear_order, init_random_

TINY_SEED = 1337  # fixed: every process builds the same tiny base, so its adapters stay valid
CONV1D = tuple(f"{t}.weight" for t in TARGET_MODULES)  # HF stores these (in, out), nn.Linear (out, in)
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # the four released GPT-2 sizes
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "gpt2_weights.pt")


class WeightsError(RuntimeError):
    """Weights could not be found or do not fit; the message says what to do."""


def load_base(name_or_path: str = "gpt2", device="auto", dtype: torch.dtype | None = None,
              progress: Callable[[str], None] | None = None) -> GPT:
    """A frozen GPT-2 in eval mode: 'tiny', a preset or hub id, or a local folder/file."""
    device = pick_device(device) if isinstance(device, str) else torch.device(device)
    dtype = dtype or default_dtype(device)
    say = progress or (lambda msg: None)
    name = str(name_or_path).strip()
    if name == "tiny":
        model = init_random_(GPT(PRESETS["tiny"]), TINY_SEED)
    else:
        path = Path(name).expanduser()
        if path.exists():
            say(f"reading weights from {path}")
            cfg, state = read_local(path)
        elif name in HUB_IDS or name in HUB_IDS.values() or _looks_like_repo(name):
            cfg, state = read_hub(HUB_IDS.get(name, name), say)
        else:
            raise WeightsError(
                f"unknown model {name!r}: use one of {', '.join(PRESETS)}, a hub id such as "
                f"openai-community/gpt2, or a path to a local weights folder or file.")
        model = build(cfg, state, cpu_dtype=dtype if device.type == "cpu" else None)
        del state  # the file's tensors: on the CPU nothing refers to them (or to its mapped pages) now
    for p in model.parameters():
        p.requires_grad_(False)
    model = model.to(device=device, dtype=dtype).eval()
    return model.use_cpu_layout() if device.type == "cpu" else model


def check_preset_shape(config: GPTConfig, preset: str, weights, advice: str) -> None:
    """WeightsError unless weights read from local files (`weights`: their path) hold GPT-2 `preset`'s shape:
    layers, width and heads (a local file's context length and epsilon may differ). advice: what to do."""
    p = PRESETS[preset]
    if (config.n_layer, config.n_embd, config.n_head) != (p.n_layer, p.n_embd, p.n_head):
        raise WeightsError(f"--weights {Path(weights).name} holds a {config.n_layer}-layer width-{config.n_embd} "
                           f"GPT-2, not {preset} ({p.n_layer} layers, width {p.n_embd}); {advice}.")


def _looks_like_repo(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def read_hub(repo_id: str, say) -> tuple[GPTConfig, dict]:
    """config.json + model.safetensors from the HF cache, downloading them if allowed."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - gradio brings it
        raise WeightsError("huggingface_hub is not installed; pip install huggingface_hub, "
                           "or pass a local weights path.") from None
    files = {}
    reachable = None
    for fname in ("config.json", "model.safetensors"):
        try:  # the cache first: no network round trip when the files are there
            files[fname] = hf_hub_download(repo_id, fname, local_files_only=True)
            continue
        except Exception:
            pass
        say(f"downloading {repo_id}/{fname} into the Hugging Face cache")
        try:
            if reachable is None:
                reachable = hub_reachable()
            if not reachable:  # huggingface_hub would retry for ~25 s before giving up
                raise ConnectionError("the hub did not answer within 3 s")
            files[fname] = hf_hub_download(repo_id, fname)
        except Exception as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            why = type(e).__name__ + (f": {str(e).splitlines()[0][:200]}" if str(e) else "")
            raise WeightsError(
                f"could not get {fname} of {repo_id} from the Hugging Face hub"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''} and it is not in the local cache "
                f"({why}). Fix: connect to the internet once to fill the cache, or pass a local "
                f"folder/file with --weights PATH (model.safetensors + config.json), or use the "
                f"'tiny' model offline.") from None
    cfg = GPTConfig.from_hf(json.loads(Path(files["config.json"]).read_text()))
    return cfg, read_state(Path(files["model.safetensors"]))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint (skipped behind a proxy, where it would mislead)."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return True  # let huggingface_hub give its own offline answer at once
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_local(path: Path) -> tuple[GPTConfig, dict]:
    """A folder (config.json + weights) or a single weights file."""
    cfg = None
    if path.is_dir():
        if (path / "config.json").is_file():
            try:
                cfg = GPTConfig.from_hf(json.loads((path / "config.json").read_text()))
            except (ValueError, KeyError) as e:
                raise WeightsError(f"{path.name}/config.json is not a GPT-2 config ({e}).") from None
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise WeightsError(
                f"no weights in {path.name}: expected one of {', '.join(WEIGHT_FILES)}.")
        file = found[0]
    else:
        file = path
    state = read_state(file)
    return cfg or infer_config(state, file), state


def read_state(file: Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or a state dict from .bin/.pt without unpickling code."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(file))
        elif file.suffix in (".bin", ".pt", ".pth"):
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"{file.name}: unsupported weights file; use .safetensors, .bin or .pt.")
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"{file.parent.name}/{file.name} could not be read as weights ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}).") from None
    for wrapper in ("model", "state_dict"):  # training checkpoints often nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{file.name} does not hold a GPT-2 state dict (a mapping of names to tensors).")
    return normalize_keys(state)


def normalize_keys(state: dict) -> dict[str, torch.Tensor]:
    """Our key names: 'transformer.' prefix, no mask buffers, no separate lm_head (tied)."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod.", "base_model.model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue
        if not k.startswith("transformer."):
            k = "transformer." + k
        out[k] = v
    return out


def infer_config(state: dict, source) -> GPTConfig:
    try:
        vocab, d = state["transformer.wte.weight"].shape
        block = state["transformer.wpe.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"{source}: missing key {e.args[0]!r}; this is not a GPT-2 checkpoint.") from None
    n_layer = sum(1 for k in state if k.endswith(".ln_1.weight"))
    if d not in HEADS_BY_WIDTH:
        raise WeightsError(f"{source}: width {d} is not a released GPT-2 size, so the number of heads "
                           f"is unknown; put a config.json beside the weights.")
    return GPTConfig(n_layer=n_layer, n_head=HEADS_BY_WIDTH[d], n_embd=d, vocab_size=vocab, block_size=block)


def build(cfg: GPTConfig, state: dict, cpu_dtype: torch.dtype | None = None) -> GPT:
    """Check names and shapes (naming the offending key), transpose Conv1D, load without a random init.

    cpu_dtype: copy each tensor into memory of its own in this dtype, the projections in the CPU's
    (out, in) order (`GPT.use_cpu_layout`), so that no weight keeps the file's memory mapping (and the
    pages read from it) alive: one copy of the weights in memory, not two. None: the file's tensors as
    they are (load_base moves them to the GPU and casts them there).
    """
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise WeightsError(f"checkpoint is missing {len(missing)} key(s), first {missing[0]!r} "
                           f"(expected {len(expected)} keys for a {cfg.n_layer}-layer, width-{cfg.n_embd} GPT-2).")
    if unexpected:
        raise WeightsError(f"checkpoint has {len(unexpected)} unexpected key(s), first {unexpected[0]!r}; "
                           f"is it a GPT-2 of {cfg.n_layer} layers?")
    # One orientation for the whole file: HF Conv1D (in, out) or nn.Linear (out, in).
    probe = f"transformer.h.0.{ATTN_QKV}.weight"
    linear = cfg.n_layer > 0 and tuple(state[probe].shape) == target_shapes(cfg)[ATTN_QKV][::-1]
    fixed = {}
    for k, v in state.items():
        if linear and k.endswith(CONV1D):
            v = v.t()
        if tuple(v.shape) != expected[k]:
            raise WeightsError(f"key {k!r} has shape {tuple(v.shape)}, expected {expected[k]}.")
        if cpu_dtype is None:
            fixed[k] = v.contiguous()
        elif k.endswith(CONV1D):
            fixed[k] = in_linear_order(v, cpu_dtype)
        else:
            fixed[k] = v.to(cpu_dtype, copy=True, memory_format=torch.contiguous_format)
    fixed["lm_head.weight"] = fixed["transformer.wte.weight"]
    model.load_state_dict(fixed, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # keep the tie after assign
    return model


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights in HF GPT2LMHeadModel layout (no tied lm_head, no LoRA tensors)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" or ".lora_" in k:
            continue
        k = k.replace(".base.", ".")
        v = v.detach().to("cpu")
        out[k] = v.contiguous()
    return out


def save_hf(model: GPT, folder, dtype: torch.dtype = torch.float32) -> Path:
    """`model`'s weights as a new HF-format folder (write_hf)."""
    return write_hf(folder, {k: v.to(dtype) for k, v in hf_state_dict(model).items()}, model.config)


def write_hf(folder, state: dict[str, torch.Tensor], cfg: GPTConfig) -> Path:
    """`state` (HF GPT2LMHeadModel layout, no lm_head) and cfg's config.json as new folder `folder`, whole or
    not at all (core.atomic.publish_dir; FileExistsError if it exists): what transformers' from_pretrained
    loads. The one writer of such folders (a base, a merged export)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    return atomic.publish_dir(folder, build)
