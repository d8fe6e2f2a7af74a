"""A pickle payload disguised as an adapter, a base model or a resume checkpoint is never unpickled.

The payload's __reduce__ opens (creates) a marker file when unpickled. Each test first proves that
the payload works (unpickling it in the test does create a marker), then offers it to the studio's
upload handler, the core library, the engine, the weights loader and the CLI, and checks that every
one refuses it with a message and that the marker never appears.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from adapter_helpers import listing, write_adapter
from core.__main__ import main
from core.adapters.format import CONFIG, WEIGHTS, peft_config
from core.adapters.validate import AdapterError
from core.adapters.library import Library
from core.adapters.resolve import load_adapter
from core.lora.layers import adapter_names
from core.model.weights import WeightsError, load_base
from studio.tabs import compare, library, train
from studio.tabs.compare import CompareForm
from bad_adapters import LC, good
from cli_helpers import TINY_RUN, cli, one_line_error
from studio_helpers import _prepare, _train


pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol 5")  # torch's note on the protocol-5 form


class Payload:
    """Unpickling this creates the file at `marker` (a stand-in for any code an attacker runs)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payloads(marker: Path) -> dict[str, bytes]:
    """The same payload in every form torch.save and pickle write."""
    obj = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": Payload(marker)}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(obj, zipped)
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    return {"torch.save zip": zipped.getvalue(), "torch.save legacy": legacy.getvalue(),
            "pickle protocol 2": pickle.dumps(obj, protocol=2), "pickle protocol 5": pickle.dumps(obj, protocol=5)}


@pytest.fixture
def marker(tmp_path) -> Path:
    """The marker path; the test fails if anything created it."""
    m = tmp_path / "PWNED"
    control = tmp_path / "control-marker"
    for kind, raw in payloads(control).items():  # the payloads are live: unpickling them runs the code
        if kind.startswith("torch"):
            torch.load(io.BytesIO(raw), weights_only=False)
        else:
            pickle.loads(raw)
        assert control.exists(), kind
        control.unlink()
    yield m
    assert not m.exists(), "a pickle payload was unpickled"


def _config(folder: Path) -> Path:
    (folder / CONFIG).write_text(json.dumps(peft_config(LC, "tiny")))
    return folder / CONFIG


def _zip(out: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    return out


def test_uploads_through_the_library_tab(studio, tmp_path, marker):
    studio.base("tiny")
    before, loaded = listing(studio.library), adapter_names(studio.engine.model)
    config = json.dumps(peft_config(LC, "tiny")).encode()
    for kind, raw in payloads(marker).items():
        folder = tmp_path / kind.replace(" ", "-")
        folder.mkdir()
        disguised = folder / WEIGHTS
        disguised.write_bytes(raw)  # a pickle named .safetensors
        with pytest.raises(AdapterError, match=r"is a PyTorch pickle \(torch\.save\), not safetensors"):
            library.import_upload(studio, [str(disguised), str(_config(folder))], "evil")
        for suffix in (".pt", ".bin", ".pth", ".ckpt", ".pkl"):
            f = folder / f"adapter_model{suffix}"
            f.write_bytes(raw)
            with pytest.raises(AdapterError, match=r"upload \.safetensors, \.zip or adapter_config\.json files only"):
                library.import_upload(studio, [str(f), str(folder / CONFIG)], "evil")
        for members, pattern in (
                ({"adapter_model.bin": raw, CONFIG: config}, r"contains adapter_model\.bin: pickle files can run code"),
                ({f"peft/{WEIGHTS}": raw, f"peft/{CONFIG}": config}, r"is a PyTorch pickle"),
                ({WEIGHTS: st_save(good()), CONFIG: config, "extra/optimizer.pt": raw},
                 r"contains extra/optimizer\.pt: pickle")):
            z = _zip(folder / "adapter.zip", members)
            with pytest.raises(AdapterError, match=pattern):
                library.import_upload(studio, [str(z)], "evil")
            z.unlink()
    assert listing(studio.library) == before and adapter_names(studio.engine.model) == loaded


def test_core_library_engine_and_loader(studio, tmp_path, marker, tiny):
    lib = Library(tmp_path / "core-lib")
    for kind, raw in payloads(marker).items():
        folder = tmp_path / kind.replace(" ", "-")
        folder.mkdir()
        _config(folder)
        (folder / "adapter_model.bin").write_bytes(raw)  # PEFT's old pickled format, alone in its folder
        with pytest.raises(AdapterError, match=r"holds adapter_model\.bin but no adapter_model\.safetensors"):
            lib.import_path(folder, "evil")
        with pytest.raises(AdapterError, match=r"never loaded"):
            lib.import_path(folder / "adapter_model.bin", "evil")
        with pytest.raises(AdapterError, match=r"holds adapter_model\.bin but no"):
            load_adapter(tiny, folder, "evil")
        (folder / WEIGHTS).write_bytes(raw)
        with pytest.raises(AdapterError, match=r"is a PyTorch pickle"):
            load_adapter(tiny, folder, "evil")
        with pytest.raises(AdapterError, match=r"is a PyTorch pickle"):
            lib.import_path(_zip(tmp_path / "a.zip", {WEIGHTS: raw, CONFIG: (folder / CONFIG).read_bytes()}), "evil")
    assert lib.list() == [] and adapter_names(tiny) == []
    # one placed in the studio's library by hand is refused when used
    studio.base("tiny")
    write_adapter(studio.library.root / "by-hand", {}, LC, base_id="tiny", raw=payloads(marker)["torch.save zip"])
    with pytest.raises(AdapterError, match=r"is a PyTorch pickle"):
        next(compare.compare(studio, CompareForm(model="tiny", adapters=["by-hand"], prompt="Hi", max_tokens=4,
                                                 seed=1)))
    with pytest.raises(AdapterError, match=r"is a PyTorch pickle"):
        library.blend(studio, ["by-hand", "by-hand"], "", "b")
    assert adapter_names(studio.engine.model) == []


def test_base_weights_files(tmp_path, marker):
    """--weights accepts .bin/.pt state dicts, read with weights_only=True: tensors, never code."""
    for kind, raw in payloads(marker).items():
        f = tmp_path / f"{kind.replace(' ', '-')}.pt"
        f.write_bytes(raw)
        with pytest.raises(WeightsError, match=r"could not be read as weights \(UnpicklingError"):
            load_base(str(f), "cpu")
        folder = tmp_path / f"hf-{kind.replace(' ', '-')}"
        folder.mkdir()
        (folder / "pytorch_model.bin").write_bytes(raw)
        with pytest.raises(WeightsError, match=r"could not be read as weights"):
            load_base(str(folder), "cpu")


def test_cli_refuses_them(tmp_path, capsys, marker):
    raw = payloads(marker)["torch.save zip"]
    (tmp_path / "evil.pt").write_bytes(raw)
    folder = tmp_path / "evil-folder"
    folder.mkdir()
    _config(folder)
    (folder / "adapter_model.bin").write_bytes(raw)
    assert "never loaded" in one_line_error(capsys, ["compare", "--lora", tmp_path / "evil.pt", "--model", "tiny"])
    assert "pickled adapter" in one_line_error(capsys, ["compare", "--lora", folder, "--model", "tiny"])
    assert "pickled adapter" in one_line_error(capsys, ["merge", "--lora", folder, "--model", "tiny", "--output",
                                                        tmp_path / "m"])
    ok = write_adapter(tmp_path / "ok", good(), LC)
    assert "could not be read as weights" in one_line_error(
        capsys, ["merge", "--lora", ok, "--weights", tmp_path / "evil.pt", "--output", tmp_path / "m"])
    assert not (tmp_path / "m").exists()


@pytest.fixture
def poisoned_run(tmp_path, marker):
    """A CLI run whose newest checkpoint's trainer_state.pt was replaced by the payload."""
    from core.train.data import SAMPLES_DIR
    ds, lib = tmp_path / "ds", tmp_path / "lib"
    assert main(["prepare", "--input", str(SAMPLES_DIR / "brainrot.txt"), "--output", str(ds)]) == 0
    assert main(["finetune", "--data", str(ds), *TINY_RUN, "--library", str(lib), "--output", "r"]) == 0
    state = lib / "r" / "checkpoints" / "step_000006" / "trainer_state.pt"
    state.write_bytes(payloads(marker)["torch.save zip"])
    return lib


def test_a_poisoned_resume_checkpoint_is_not_unpickled(poisoned_run, tmp_path, marker):
    r = cli("finetune", "--resume", "r", "--library", poisoned_run, "--steps", "8", cwd=tmp_path)
    assert r.returncode != 0 and not marker.exists()
    assert json.loads((poisoned_run / "r" / "studio.json").read_text())["steps"] == 6  # nothing was overwritten


def test_a_poisoned_resume_checkpoint_is_a_one_line_error(poisoned_run, capsys, marker):
    capsys.readouterr()
    err = one_line_error(capsys, ["finetune", "--resume", "r", "--library", poisoned_run, "--steps", "8"])
    assert "could not be read" in err and "weights_only" not in err


def test_a_poisoned_checkpoint_resumed_in_the_studio(studio, marker):
    _prepare(studio)
    _train(studio, "run", 3)
    state = studio.library.root / "run" / "checkpoints" / "step_000003" / "trainer_state.pt"
    state.write_bytes(payloads(marker)["torch.save zip"])
    train.resume(studio, "run", 6)
    snap = studio.runs.wait(60)
    assert snap["state"] == "failed" and not marker.exists()
    assert "could not be read (UnpicklingError); resume from another one" in snap["message"], snap["message"]
    assert "weights_only" not in snap["message"]
    assert studio.library.details("run")["steps"] == 3  # the finished adapter is as it was
