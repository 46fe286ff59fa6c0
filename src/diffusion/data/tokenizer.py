"""The caption tokenizer: a small BPE trained on the training captions (Hugging Face `tokenizers`).

Pinned ids (docs/INTERFACES.md, Tokens): ``[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3``. Every caption becomes
``[BOS] ... [EOS] [PAD]*`` of exactly ``max_length`` ids; the mask is ``tokens != 0``; the null caption used
for classifier-free guidance and caption dropout is the encoding of ``""``, i.e. ``[BOS, EOS, PAD, ...]``.

The saved ``tokenizer.json`` holds the normalizer, pre-tokenizer, template, padding and truncation; one setting
it does not keep is that text spelling a special token (``"[PAD]"`` in a caption or a prompt) is read as
ordinary characters, not as that token (:func:`literal_special_tokens`). :func:`load_tokenizer` sets it again;
``tokenizers.Tokenizer.from_file(path)`` alone would turn such text into a real ``[PAD]`` or ``[EOS]`` id.

Choices, and why:
- Normalizer NFKC + lowercase + whitespace collapsed: captions differ in case and spacing, not meaning.
- Pre-tokenizer: punctuation split off, then Metaspace (``"▁red"``), so ``decode`` restores spaces.
- No ``end_of_word_suffix`` / ``continuing_subword_prefix``: with either, the BPE trainer assigns ids to
  the suffixed characters in hash-map order, so the same captions give a different vocabulary in each
  process (huggingface/tokenizers#1794, PR #2066). Without them the alphabet is sorted and merge ties are
  broken by ids, so training is deterministic (checked across processes by ``tests/test_tokenizer.py``).
- Truncation with the ``[BOS] $A [EOS]`` template keeps ``[EOS]`` last: `tokenizers` reserves room for the
  template's special tokens when truncating (checked by a test).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from diffusion.atomic import atomic_write_text

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )


def train_tokenizer(captions: Iterable[str], vocab_size: int, max_length: int) -> Tokenizer:
    """Train a BPE tokenizer on `captions`; pads and truncates every encoding to `max_length` ids.

    Args:
        captions: the training captions (iterated once; order does not change the result).
        vocab_size: the vocabulary wanted, special tokens included: fewer if the captions have fewer
            distinct pieces, more if they have more distinct characters (BPE keeps every character, so
            captions in a script of thousands of characters exceed it; the text encoder is sized from the
            trained tokenizer, not from this number).
        max_length: ids per encoded caption, ``[BOS]`` and ``[EOS]`` included (>= 2).
    """
    if max_length < 2:
        raise ValueError(f"max_length: expected >= 2 (room for [BOS] and [EOS]), got {max_length}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: expected > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.Metaspace(prepend_scheme="first")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(captions, trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [PAD_ID, UNK_ID, BOS_ID, EOS_ID]:  # the trainer adds special tokens first, in order
        raise RuntimeError(f"special token ids {dict(zip(SPECIAL_TOKENS, ids))}, expected 0, 1, 2, 3")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
    )
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=max_length)
    return literal_special_tokens(tok)


def literal_special_tokens(tok: Tokenizer) -> Tokenizer:
    """Make text that spells a special token (``"a red [PAD] circle"``) encode as ordinary characters; returns
    `tok`. `tokenizers` otherwise matches special tokens in the raw text: a caption would carry a real ``[PAD]``
    (id 0, masked out as padding) or ``[EOS]`` in its middle. The template's ``[BOS]``/``[EOS]`` and the padding
    are added by id and are unaffected. Not saved in ``tokenizer.json``: set it after every load."""
    tok.encode_special_tokens = True
    return tok


def max_length_of(tok: Tokenizer) -> int:
    """The fixed encoded length (from the tokenizer's padding settings)."""
    padding = tok.padding
    if not padding or not padding.get("length"):
        raise ValueError("tokenizer has no fixed padding length; build it with train_tokenizer")
    return int(padding["length"])


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json`` atomically (temporary file + rename)."""
    return atomic_write_text(path, tok.to_str())


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer written by :func:`save_tokenizer`; a clear error names the file and the stage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: tokenizer not found. It is written by the shard stage: run `python cli.py shard` "
            "(or `dvc repro shard`) first"
        )
    tok = literal_special_tokens(Tokenizer.from_file(str(path)))
    max_length_of(tok)  # fail early on a tokenizer without fixed padding
    return tok


def encode(tok: Tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids of `captions`: (B, max_length) long, ``[BOS] ... [EOS] [PAD]*``."""
    if isinstance(captions, str):
        raise TypeError("encode takes a list of captions, not a single string")
    if not captions:
        return torch.zeros(0, max_length_of(tok), dtype=torch.long)
    encodings = tok.encode_batch(list(captions))
    return torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (B, T)


def trim_padding(tokens: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """(B, max_length) -> (B, L): drop the trailing padding columns that every row of the batch has, L being
    the longest caption's length (at least 2, BOS and EOS).

    For training batches: a caption here is ~15 tokens of 32, and the text encoder and every
    cross-attention's keys and values cost in proportion to the columns (17% of a CPU train step at the
    default sizes). Nothing else changes: padding is masked as keys, so the real tokens' states, the pooled
    EOS state and the cross-attention outputs are the same either way.
    """
    if not tokens.numel():
        return tokens
    real = (tokens != pad_id).any(dim=0)  # (T,): some row has a real token in this column
    longest = int(torch.arange(1, tokens.shape[1] + 1, device=tokens.device)[real].max()) if real.any() else 0
    return tokens[:, :max(longest, 2)]


def null_tokens(tok_or_max_length: Tokenizer | int, batch: int = 1) -> torch.Tensor:
    """The null condition, the encoding of ``""``: ``[BOS, EOS, PAD, ...]``, (batch, max_length) long."""
    if isinstance(tok_or_max_length, int):
        row = torch.full((tok_or_max_length,), PAD_ID, dtype=torch.long)
        row[:2] = torch.tensor([BOS_ID, EOS_ID])
    else:
        row = torch.tensor(tok_or_max_length.encode("").ids, dtype=torch.long)
    return row.unsqueeze(0).expand(batch, -1).clone()  # (B, T)


def unknown_words(tok: Tokenizer, text: str) -> list[str]:
    """The whitespace-separated words of `text` that map (at least partly) to ``[UNK]``.

    A BPE tokenizer spells any word made of characters it has seen; only characters absent from the
    training captions become ``[UNK]``, so these are the words whose meaning the model cannot see.
    """
    unknown = []
    for word in text.split():
        normalized = tok.normalizer.normalize_str(word)
        pieces = tok.pre_tokenizer.pre_tokenize_str(normalized)
        if any(t.id == UNK_ID for piece, _ in pieces for t in tok.model.tokenize(piece)):
            unknown.append(word)
    return unknown


def unknown_characters(tok: Tokenizer, word: str) -> list[str]:
    """The characters of `word` (as the tokenizer normalizes it, e.g. lowercased) that it reads as ``[UNK]``, in
    order, each once: the part of an :func:`unknown_words` word the model cannot see. The rest of the word is
    still spelled in subword pieces."""
    seen: list[str] = []
    for char in tok.normalizer.normalize_str(word):
        if char.strip() and char not in seen and any(t.id == UNK_ID for t in tok.model.tokenize(char)):
            seen.append(char)
    return seen
