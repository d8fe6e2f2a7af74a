"""Shared fixtures: small random GPT-2 checkpoints written in HF format, the tiny preset, a studio on it,
and a dataset prepared by the CLI. Shared helpers: adapter_helpers, bad_adapters, cli_helpers, studio_helpers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from core.model.config import GPTConfig
from core.train import data  # noqa: E402

# gpt2-shaped (width 64, 4 heads) and gpt2-medium-shaped (different width and head count) tiny configs
SMALL = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)
MEDIUM_SHAPED = GPTConfig(n_layer=2, n_head=16, n_embd=128, block_size=128)


def write_hf_checkpoint(folder: Path, cfg: GPTConfig = SMALL, seed: int = 0) -> Path:
    """Random GPT2LMHeadModel saved by transformers itself (model.safetensors + config.json)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                     vocab_size=cfg.vocab_size, n_positions=cfg.block_size,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def hf_small(tmp_path) -> Path:
    return write_hf_checkpoint(tmp_path / "small", SMALL)


@pytest.fixture
def tiny():
    from core.model.weights import load_base
    return load_base("tiny", device="cpu")


@pytest.fixture
def studio(tmp_path):
    """A studio on the tiny model in a fresh library and datasets folder; a run still going is stopped.
    fp32: tests hold its numbers against fp32 models (`tiny`, `source`); on a CPU with native bf16 the
    default (--precision auto) would give a bf16 base (tests/test_precision.py covers that)."""
    from studio.app import create_studio
    s = create_studio(tmp_path / "lib", tmp_path / "datasets", "cpu", "tiny", precision="fp32")
    yield s
    s.runs.stop_all(60)


@pytest.fixture
def prepared(tmp_path):
    """A dataset folder made by the CLI from a bundled sample text."""
    from core.__main__ import main
    from core.train.data import SAMPLES_DIR
    main(["prepare", "--input", str(SAMPLES_DIR / "brainrot.txt"), "--output", str(tmp_path / "ds")])
    return tmp_path / "ds"


@pytest.fixture(scope="module")
def sample_ds():
    """The brainrot sample text (~1,100 tokens), in memory."""
    return data.prepare(text=data.load_sample("brainrot"), text_name="brainrot.txt")


@pytest.fixture
def tiny_ab(tiny):
    """tiny with adapters 'a' (attention) and 'b' (MLP), B random enough to change greedy text."""
    from adapter_helpers import with_ab
    return with_ab(tiny)


@pytest.fixture
def source():
    """A separate tiny model holding adapters x and y (random, strong enough to change greedy text)."""
    from adapter_helpers import LX, LY, make_adapter
    from core.model.weights import load_base
    m = load_base("tiny", device="cpu")
    make_adapter(m, "x", LX, seed=1, std=0.3)
    make_adapter(m, "y", LY, seed=2, std=0.3)
    return m


@pytest.fixture
def engine_xy(tmp_path, source):
    """An Engine on tiny whose library holds source's adapters x and y (closed after the test)."""
    from adapter_helpers import LX, LY
    from core.engine import Engine
    e = Engine("cpu", tmp_path / "lib")
    e.library.save(source, "x", "x", LX, "tiny")
    e.library.save(source, "y", "y", LY, "tiny")
    e.base("tiny")
    yield e
    e.close()
