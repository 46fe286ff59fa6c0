"""Tokenizer: pinned special ids, padding and truncation, EOS kept, determinism, saving, unknown words."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

from diffusion.data.tokenizer import (
    BOS_ID, EOS_ID, PAD_ID, UNK_ID, encode, load_tokenizer, null_tokens, save_tokenizer, train_tokenizer,
    unknown_characters, unknown_words,
)

CAPTIONS = [
    f"a {c} {s} in the {p}"
    for c in ("red", "green", "blue", "purple")
    for s in ("circle", "square", "triangle")
    for p in ("top left", "bottom right", "centre")
] + ["Two shapes, one ABOVE the other."]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CAPTIONS, vocab_size=120, max_length=10)


def test_special_ids(tok):
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[BOS]", "[EOS]")] == [0, 1, 2, 3]
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)


def test_padding_truncation_and_eos(tok):
    ids = encode(tok, ["a red circle", "", "a red circle in the top left " * 5])
    assert ids.shape == (3, 10) and ids.dtype == torch.long
    short = ids[0]
    n = int((short != PAD_ID).sum())
    assert short[0] == BOS_ID and short[n - 1] == EOS_ID and (short[n:] == PAD_ID).all() and 3 <= n < 10
    assert ids[1].tolist() == [BOS_ID, EOS_ID] + [PAD_ID] * 8
    long = ids[2]
    assert long[0] == BOS_ID and long[-1] == EOS_ID and (long != PAD_ID).all()  # truncated, EOS kept
    assert torch.equal(null_tokens(tok, 2), ids[1].expand(2, -1))
    assert torch.equal(null_tokens(10, 2), null_tokens(tok, 2))


def test_normalisation_and_decode(tok):
    a, b = encode(tok, ["A  RED circle", "a red circle"])
    assert torch.equal(a, b)
    assert tok.decode(b.tolist()) == "a red circle"


def test_deterministic_across_processes(tmp_path):
    """Hash-map order differs per process in the Rust trainer, so compare two fresh processes."""
    script = (
        "import sys, json; from diffusion.data.tokenizer import train_tokenizer; "
        "caps = json.loads(sys.stdin.read()); print(train_tokenizer(caps, 120, 10).to_str())"
    )
    procs = [  # run side by side: each process pays for importing torch
        subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(json.dumps(CAPTIONS), timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == train_tokenizer(CAPTIONS, 120, 10).to_str() + "\n"


def test_save_and_load(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path / "data" / "tokenizer.json")
    loaded = Tokenizer.from_file(str(path))  # the file alone holds padding, truncation and template
    caps = ["a blue square in the centre", "", "a green triangle " * 9]
    assert torch.equal(encode(loaded, caps), encode(tok, caps))
    assert torch.equal(encode(load_tokenizer(path), caps), encode(tok, caps))
    with pytest.raises(FileNotFoundError, match=r"missing\.json.*cli\.py shard"):
        load_tokenizer(tmp_path / "missing.json")


def test_text_spelling_a_special_token_is_ordinary_text(tok, tmp_path):
    """'[PAD]' or '[EOS]' written in a caption must not become the real id (0 would be masked out as padding,
    3 would end the caption early), in the trained tokenizer and in one loaded back from its file."""
    loaded = load_tokenizer(save_tokenizer(tok, tmp_path / "tokenizer.json"))
    for t in (tok, loaded):
        for word in ("[PAD]", "[EOS]", "[BOS]"):
            ids = encode(t, [f"a {word} circle"])[0].tolist()
            real = ids[1:ids.index(EOS_ID)]
            assert ids[0] == BOS_ID and PAD_ID not in real and BOS_ID not in real, (word, ids)
        # the template's own specials and the null caption are unchanged
        assert encode(t, [""])[0].tolist()[:3] == [BOS_ID, EOS_ID, PAD_ID]


def test_unknown_words(tok):
    assert unknown_words(tok, "a red circle") == []
    assert unknown_words(tok, "a ✓ red zebra") == ["✓", "zebra"]  # no 'z' in the training captions
    assert unknown_characters(tok, "Zebraz") == ["z"]  # as normalized (lowercased), once
    assert unknown_characters(tok, "red") == []
