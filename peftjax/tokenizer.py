"""Tokenizers through transformers' ``AutoTokenizer`` (no torch needed)."""

from __future__ import annotations

import os

from peftjax.models._hub import resolve_model_dir
from peftjax.models._safetensors import CheckpointError


def load_tokenizer(name_or_path: str, *, revision: str | None = None, padding_side: str = "left",
                   **kwargs):
    """Loads the tokenizer (and its chat template) of a model directory, ``pkg:`` folder or Hub id.

    ``padding_side`` defaults to ``left``, what batched generation needs. A tokenizer without a
    pad token gets its EOS token as pad token. Extra keyword arguments go to
    ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer

    path = os.path.expanduser(name_or_path)
    if not name_or_path.startswith("pkg:") and not os.path.isdir(path) and (
            path.startswith((".", "/", "~")) or os.path.exists(path)):
        raise CheckpointError(f"{name_or_path}: no such directory (expected a model or tokenizer "
                              "directory).")
    if name_or_path.startswith("pkg:") or os.path.isdir(path):
        source = (resolve_model_dir(name_or_path) if name_or_path.startswith("pkg:")
                  else os.path.expanduser(name_or_path))
    else:
        source = name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, padding_side=padding_side,
                                            **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not load a tokenizer from {name_or_path!r}: "
                              f"{str(e).splitlines()[0]}. Pass a directory with tokenizer.json / "
                              "tokenizer_config.json, or a Hub id when online.") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
