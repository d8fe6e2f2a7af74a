"""The GPT-2 tokenizer comes from the bundled, sha256-checked file."""
import shutil

import pytest

from core.model import tokenizer


def test_hello_world_encodes_to_gpt2_ids():
    assert tokenizer.encode("Hello world") == [15496, 995]


def test_endoftext_is_50256():
    assert tokenizer.encode("a<|endoftext|>b")[1] == 50256


@pytest.mark.parametrize("text", ["naïve café — 東京 🚀 \t\n  spaces", "ÿ\x00\x7f", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 👩‍👩‍👧"])
def test_unicode_round_trip_is_lossless(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_corrupted_file_is_refused_with_a_clear_error(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    shutil.copy(tokenizer.ASSET, bad)
    with open(bad, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    with pytest.raises(tokenizer.TokenizerFileError, match="corrupted"):
        tokenizer.load_encoding(bad)


def test_missing_file_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(tokenizer.TokenizerFileError, match="could not be read"):
        tokenizer.load_encoding(tmp_path / "nope.tiktoken")
