"""The headless CLI (python -m core ...): the whole workflow in subprocesses, and one-line errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from core.__main__ import main
from core.train.data import SAMPLES_DIR
from cli_helpers import ROOT, TINY_RUN, cli, one_line_error

STEP_LINE = re.compile(r"^step +\d+ \| loss \d+\.\d+ \| lr \d\.\d+e[-+]\d+ \| norm \d+\.\d+ \| dt \d+\.\d+ms \| "
                       r"tok/sec \d+\.\d+ \| +\d+% ETA \d+s$", re.M)
def test_prepare_finetune_compare_merge_end_to_end(tmp_path):
    r = cli("prepare", "--input", SAMPLES_DIR / "brainrot.txt", SAMPLES_DIR / "pirate_recipes.txt",
            "--output", "ds", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    for shown in (f"characters: {meta['chars']:,}", f"tokens: {meta['tokens']:,}",
                  f"split: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val", "train_00000.npy"):
        assert shown in r.stdout

    r = cli("finetune", "--data", "ds", *TINY_RUN, "--library", tmp_path / "lib", "--output", "pirate-rot",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(STEP_LINE.findall(r.stdout)) == 4  # steps 1, 2, 4, 6
    assert "val loss" in r.stdout and "finished after 6 steps" in r.stdout
    run = tmp_path / "lib" / "pirate-rot"
    assert {p.name for p in run.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "studio.json",
                                               "history.jsonl", "checkpoints"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    studio = json.loads((run / "studio.json").read_text())
    assert studio["base_model"] == "tiny" and studio["status"] == "finished" and studio["steps"] == 6

    r = cli("compare", "--lora", "pirate-rot", "--lora", "pirate-rot@step_000003", "--library", tmp_path / "lib",
            "--prompts", "Ahoy", "--samples", "2", "--max-tokens", "8", "--seed", "7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "terminate called" not in r.stderr  # the scheduler's thread was stopped before the interpreter exited
    header = [l for l in r.stdout.splitlines() if l.startswith("base ") and "|" in l]
    assert len(header) == 2 and all("pirate-rot" in h and "pirate-rot@step_000003" in h for h in header)
    assert r.stdout.count("prompt: 'Ahoy'") == 2 and "seed 7" in r.stdout and "seed 8" in r.stdout

    r = cli("merge", "--lora", "pirate-rot", "--library", tmp_path / "lib", "--output", "merged", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "merged").iterdir()} == {"config.json", "model.safetensors"}
    transformers = pytest.importorskip("transformers")
    from core.adapters.resolve import load_adapter
    from core.model.weights import load_base
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    ours = load_base("tiny", "cpu")
    load_adapter(ours, run, "pirate-rot")
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids, "pirate-rot"), atol=1e-4)


def test_compare_goes_through_the_decode_scheduler_and_stops_it_before_returning(tmp_path, source, capsys,
                                                                                 monkeypatch):
    import shutil
    import core.engine
    from adapter_helpers import LX
    from core.__main__ import _side_by_side
    from core.adapters.library import Library
    from core.generate.sampling import SamplingConfig
    from core.generate.scheduler import DecodeScheduler
    made, engines = [], []

    class Recorded(DecodeScheduler):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    class Kept(core.engine.Engine):  # kept alive here: dropping the engine is not what stops the loop
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            engines.append(self)
    monkeypatch.setattr(core.engine, "DecodeScheduler", Recorded)
    monkeypatch.setattr(core.engine, "Engine", Kept)
    lib = tmp_path / "lib"
    Library(lib).save(source, "x", "x", LX, "tiny")
    assert main(["compare", "--lora", "x", "--library", str(lib), "--prompts", "Ahoy", "--samples", "2",
                 "--max-tokens", "6", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert len(made) == 1 and made[0].step_count >= 6  # one scheduler decoded both samples
    assert not made[0]._thread.is_alive()  # stopped and joined before the command returned
    # the same texts as each sample alone through another engine, on the base the CLI loaded: --precision
    # auto (bf16 on CPUs that compute it natively)
    from core.device import precision_dtype
    loop = Kept("cpu", lib, dtype=precision_dtype("auto", torch.device("cpu")))
    loop.base("tiny")
    width = max(24, (shutil.get_terminal_size((120, 24)).columns - 3) // 2)
    for seed in (5, 6):
        texts = list(loop.compare("Ahoy", [None, "x"], SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=50,
                                                                     seed=seed)))[-1]
        assert _side_by_side(["base", "x"], ["Ahoy" + t for t in texts], width) in out


def test_every_command_has_help():
    for cmd, option in (("prepare", "--train-ratio"), ("finetune", "--grad-accum"), ("compare", "--samples"),
                        ("merge", "--output")):
        r = subprocess.run([sys.executable, "-m", "core", cmd, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and option in r.stdout and "--help" in r.stdout


def test_bad_input_in_a_real_process_is_one_line_without_traceback(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)))
    r = cli("prepare", "--input", "blob.txt", "--output", "ds", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "blob.txt" in r.stderr and "binary" in r.stderr


def test_prepare_errors_name_the_problem(tmp_path, capsys):
    out = ["--output", tmp_path / "d"]
    assert "nope.txt" in one_line_error(capsys, ["prepare", "--input", tmp_path / "nope.txt", *out])
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")
    assert "bin.txt" in one_line_error(capsys, ["prepare", "--input", tmp_path / "bin.txt", *out])
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in one_line_error(capsys, ["prepare", "--input", tmp_path / "empty.txt", *out])
    (tmp_path / "ok.txt").write_text("enough words to split into two parts " * 5)
    assert "train ratio" in one_line_error(capsys, ["prepare", "--input", tmp_path / "ok.txt", *out,
                                                    "--train-ratio", "1.5"])


@pytest.mark.parametrize("args,expect", [
    (["--rank", "0"], "rank must be"),
    (["--rank", "-4"], "rank must be"),
    (["--lr", "0"], "learning rate"),
    (["--lr=-1e-3"], "learning rate"),
    (["--steps", "0"], "steps"),
    (["--model", "gpt-17"], "unknown model 'gpt-17'"),
    (["--targets", "c_nope"], "unknown target module"),
    (["--rank", "eight"], "invalid int value"),
    (["--output", "bad name!"], "invalid adapter name"),
])
def test_finetune_rejects_bad_settings(prepared, tmp_path, capsys, args, expect):
    argv = ["finetune", "--data", prepared, "--model", "tiny", "--library", tmp_path / "lib", *args]
    assert expect in one_line_error(capsys, argv)
    assert not (tmp_path / "lib").exists()  # nothing was written


def test_finetune_needs_a_dataset_folder(tmp_path, capsys):
    argv = ["finetune", "--data", tmp_path / "none", "--model", "tiny"]
    assert "no such dataset folder" in one_line_error(capsys, argv)


def test_malformed_adapters_are_refused_by_compare_and_merge(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                         "target_modules": ["c_attn"], "fan_in_fan_out": True,
                                                         "base_model_name_or_path": "tiny"}))
    assert "adapter_model.safetensors" in one_line_error(capsys, ["compare", "--lora", bad, "--model", "tiny"])
    assert "adapter_model.safetensors" in one_line_error(
        capsys, ["merge", "--lora", bad, "--model", "tiny", "--output", tmp_path / "m"])
    assert "no adapter" in one_line_error(capsys, ["compare", "--lora", "missing", "--library", tmp_path / "lib"])
    assert not (tmp_path / "m").exists()


def test_stop_and_resume_from_the_cli(prepared, tmp_path, capsys):
    lib = tmp_path / "lib"
    assert main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(lib), "--output", "r"]) == 0
    capsys.readouterr()
    assert "--rank cannot be changed" in one_line_error(
        capsys, ["finetune", "--resume", lib / "r", "--rank", "4", "--steps", "9", "--model", "tiny"])
    # the run folder (its newest checkpoint) or a library name resumes; the dataset path is remembered
    assert main(["finetune", "--resume", "r", "--library", str(lib), "--steps", "8", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "resuming from step_000006" in out and "finished after 8 steps" in out
    assert json.loads((lib / "r" / "studio.json").read_text())["steps"] == 8


def test_output_path_trains_and_resumes_outside_the_library_without_making_one(prepared, tmp_path, capsys):
    run = tmp_path / "elsewhere" / "run"
    lib = tmp_path / "lib"
    assert main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(lib), "--output", str(run)]) == 0
    assert main(["finetune", "--resume", str(run), "--library", str(lib), "--steps", "8"]) == 0
    assert "finished after 8 steps" in capsys.readouterr().out
    assert json.loads((run / "studio.json").read_text())["steps"] == 8 and not lib.exists()


def test_weights_path_is_the_recorded_base_and_must_match_model(prepared, hf_small, tmp_path, capsys):
    lib = tmp_path / "lib"
    assert "not gpt2" in one_line_error(capsys, ["finetune", "--data", prepared, "--model", "gpt2", "--weights",
                                                 hf_small, "--library", lib, "--steps", "1"])
    argv = ["finetune", "--data", str(prepared), "--weights", str(hf_small), "--library", str(lib), "--output", "w",
            "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--grad-accum", "1"]
    assert main(argv) == 0
    studio = json.loads((lib / "w" / "studio.json").read_text())
    assert studio["base_model"] == str(hf_small.resolve())
    capsys.readouterr()
    # compare never reads a local path an adapter records (its files may come from anyone): --weights says it
    assert "pass --model or --weights" in one_line_error(
        capsys, ["compare", "--lora", "w", "--library", lib, "--samples", "1", "--max-tokens", "4"])
    assert main(["compare", "--lora", "w", "--library", str(lib), "--weights", str(hf_small), "--samples", "1",
                 "--max-tokens", "4"]) == 0
    assert f"base model: {hf_small.resolve()} (2 layers, width 64" in capsys.readouterr().out


def test_finetune_on_a_4bit_base_with_checkpointing_lowers_the_loss(tmp_path, prepared, capsys):
    rc = main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(tmp_path / "lib"),
               "--output", "q", "--quantize", "nf4", "--checkpointing"])
    out = capsys.readouterr().out
    assert rc == 0 and "quantized to nf4" in out
    meta = json.loads((tmp_path / "lib" / "q" / "studio.json").read_text())
    assert meta["val_loss"] < meta["start_val_loss"]
