"""What the model will not see as the user wrote it: the prompt warnings of ``TextToImagePipeline.check_prompts``
(``diffusion.pipeline_model``), which ``cli.py sample`` prints and the pipeline raises as ``PromptWarning``.

Empty prompts (the null caption), characters outside the tokenizer's vocabulary (read as ``[UNK]``) and prompts
over its ``max_length`` (truncated) are warnings, not errors: sampling proceeds, as a user of diffusers expects.
Light to import (the tokenizers library is imported when a prompt is checked), as ``pipeline_model`` is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _untruncated(tokenizer: Any) -> Any:
    """A copy of `tokenizer` without truncation or padding, to count the tokens a prompt really has."""
    from tokenizers import Tokenizer

    from diffusion.data.tokenizer import literal_special_tokens

    tok = literal_special_tokens(Tokenizer.from_str(tokenizer.to_str()))
    tok.no_truncation()
    tok.no_padding()
    return tok


def prompt_warnings(tokenizer: Any, prompts: Sequence[str], kind: str = "prompt") -> list[str]:
    """What the model will not see as written: empty prompts (unconditional), characters outside the vocabulary
    (``[UNK]``), prompts longer than the tokenizer's ``max_length`` (truncated; counted before truncation).
    `kind` names them in the messages; an empty ``"negative prompt"`` is the default null caption, not news."""
    from diffusion.data.tokenizer import max_length_of, unknown_words

    limit, counter, out = max_length_of(tokenizer), _untruncated(tokenizer), []
    for i, prompt in enumerate(prompts):
        quoted = repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")
        name = f"{kind} {i + 1} ({quoted})" if len(prompts) > 1 else f"{kind} {quoted}"
        if not prompt.strip():
            if kind == "prompt":
                out.append(f"{name} is empty: sampling unconditionally (the null caption of classifier-free "
                           "guidance)")
            continue
        unknown = unknown_words(tokenizer, prompt)
        if unknown:
            # BPE spells any word of known characters in pieces; only unseen characters become [UNK].
            parts = [_unknown_part(tokenizer, word) for word in unknown]
            out.append(f"{name}: characters outside the vocabulary (never in the training captions), read as "
                       f"[UNK]: {', '.join(parts)}")
        n = len(counter.encode(prompt).ids)  # [BOS] and [EOS] included, as max_length counts them
        if n > limit:
            out.append(f"{name} has {n} tokens, over the maximum of {limit}: it is truncated")
    return out


def _unknown_part(tokenizer: Any, word: str) -> str:
    """``'z' in 'zebra'``, or ``'✓'`` for a word that is all unknown characters."""
    from diffusion.data.tokenizer import unknown_characters

    chars = unknown_characters(tokenizer, word)
    if "".join(chars) == tokenizer.normalizer.normalize_str(word):
        return repr(word)
    return f"{', '.join(map(repr, chars))} in {word!r}"
