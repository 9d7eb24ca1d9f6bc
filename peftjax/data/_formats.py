"""Rows -> tokenised examples for the four formats.

An example is a dict: ``input_ids`` (int32 [T]) and ``labels`` (int32 [T] with -100 on tokens
that are not targets, for the language-model formats; an int class for ``classification``),
optionally ``token_type_ids`` (text pairs), and for ``instruction``: ``prompt_len`` and
``response`` (the expected text, for generation accuracy).

- ``classification``: ``text_field`` [+ ``text_pair_field``] -> ``label_field`` (an int, or a
  string listed in ``label_names``).
- ``instruction``: a prompt (``prompt_field`` or ``prompt_template``, a ``str.format`` template over
  the row's fields) and a response (``response_field`` or ``response_template``); the loss covers
  the response tokens and the EOS token only. ``use_chat_template`` wraps the prompt as a user
  turn with the tokenizer's chat template.
- ``chat``: ``messages_field`` holds ``[{"role", "content"}, ...]``, rendered with the chat
  template; the loss covers the assistant turns.
- ``text``: plain language modelling on ``text_field``; every token is a target.

With ``task_field`` set (mixed-task data for a prompt bank), every example also gets
``task_ids``: the row's task as an int, or a string listed in ``task_names``.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # a label the losses skip (PyTorch's and transformers' convention)


def _fill(template: str | None, field: str, row: dict, what: str):
    if template is None:
        if field not in row:
            raise ValueError(f"data rows have no field {field!r} for the {what} (fields: "
                             f"{sorted(row)}); set data.{what}_field or data.{what}_template")
        return str(row[field])
    try:
        return template.format_map(row)
    except KeyError as e:
        raise ValueError(f"data.{what}_template uses {{{e.args[0]}}} but the rows have fields "
                         f"{sorted(row)}") from None


def _truncate(ids: list[int], n: int, side: str) -> list[int]:
    if len(ids) <= n:
        return ids
    return ids[:n] if side == "right" else ids[len(ids) - n:]


def label_index(value, label_names, where: str) -> int:
    if isinstance(value, str):
        if not label_names or value not in label_names:
            raise ValueError(f"{where}: label {value!r} is a string; list the classes in "
                             f"data.label_names (got {list(label_names or [])})")
        return list(label_names).index(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}: label {value!r} must be an integer class or a string")
    return int(value)


def _classification(rows, cfg, tok):
    for i, row in enumerate(rows):
        if cfg.text_field not in row or cfg.label_field not in row:
            raise ValueError(f"row {i}: needs fields {cfg.text_field!r} and {cfg.label_field!r} "
                             f"(has {sorted(row)}); set data.text_field / data.label_field")
    texts = [str(r[cfg.text_field]) for r in rows]
    pairs = [str(r[cfg.text_pair_field]) for r in rows] if cfg.text_pair_field else None
    enc = tok(texts, pairs, truncation=True, max_length=cfg.max_length)
    out = []
    for i, row in enumerate(rows):
        ex = {"input_ids": np.asarray(enc["input_ids"][i], np.int32),
              "labels": label_index(row[cfg.label_field], cfg.label_names, f"row {i}")}
        if pairs is not None and "token_type_ids" in enc:
            ex["token_type_ids"] = np.asarray(enc["token_type_ids"][i], np.int32)
        out.append(ex)
    return out


def _lm_example(prompt_ids, target_ids, max_length, side):
    keep = max_length - len(target_ids)
    if keep < 1:  # the target alone fills the window: keep one prompt token, cut the target
        target_ids = target_ids[:max_length - 1]
        keep = 1
    prompt_ids = _truncate(prompt_ids, keep, side)
    ids = list(prompt_ids) + list(target_ids)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(target_ids)
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32), len(prompt_ids)


def _instruction(rows, cfg, tok):
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out = []
    for row in rows:
        prompt = _fill(cfg.prompt_template, cfg.prompt_field, row, "prompt")
        response = _fill(cfg.response_template, cfg.response_field, row, "response")
        if cfg.use_chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tok(prompt)["input_ids"]
        target = tok(response, add_special_tokens=False)["input_ids"] + eos
        ids, labels, n_prompt = _lm_example(prompt_ids, target, cfg.max_length, cfg.truncation_side)
        out.append({"input_ids": ids, "labels": labels, "prompt_len": n_prompt,
                    "response": response})
    return out


def _chat(rows, cfg, tok):
    out = []
    for i, row in enumerate(rows):
        messages = row.get(cfg.messages_field)
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"row {i}: field {cfg.messages_field!r} must be a list of "
                             "{'role', 'content'} messages; set data.messages_field")
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        labels = [IGNORE_INDEX] * len(ids)
        for j, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            # tokens added by turn j = render(messages[:j+1]) minus render(prefix + prompt)
            start = len(tok.apply_chat_template(messages[:j], tokenize=True,
                                                add_generation_prompt=True, return_dict=False))
            stop = len(tok.apply_chat_template(messages[:j + 1], tokenize=True, return_dict=False))
            labels[start:stop] = ids[start:stop]
        ids, labels = _truncate(ids, cfg.max_length, "right"), _truncate(labels, cfg.max_length, "right")
        out.append({"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)})
    return out


def _text(rows, cfg, tok):
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    texts = []
    for i, row in enumerate(rows):
        if cfg.text_field not in row:
            raise ValueError(f"row {i}: no field {cfg.text_field!r} (has {sorted(row)}); "
                             "set data.text_field")
        texts.append(str(row[cfg.text_field]))
    enc = tok(texts)["input_ids"]
    out = []
    for ids in enc:
        ids = list(ids) + eos
        if not cfg.packing:
            ids = _truncate(ids, cfg.max_length, cfg.truncation_side)
        arr = np.asarray(ids, np.int32)
        out.append({"input_ids": arr, "labels": arr.copy()})
    return out


FORMATS = {"classification": _classification, "instruction": _instruction, "chat": _chat,
           "text": _text}


def tokenize_rows(rows: list[dict], cfg, tokenizer) -> list[dict]:
    """Tokenises ``rows`` by ``cfg.format`` (a :class:`peftjax.config.DataSection`)."""
    examples = FORMATS[cfg.format](rows, cfg, tokenizer)
    if getattr(cfg, "task_field", None):  # mixed-task data: each example names its task
        for i, (row, ex) in enumerate(zip(rows, examples, strict=True)):
            if cfg.task_field not in row:
                raise ValueError(f"row {i}: no task field {cfg.task_field!r} (has {sorted(row)}); "
                                 "set data.task_field")
            ex["task_ids"] = label_index(row[cfg.task_field], cfg.task_names,
                                         f"row {i} (task)")
    return [ex for ex in examples if len(ex["input_ids"]) > 0]


def pack(examples: list[dict], length: int) -> list[dict]:
    """Concatenates LM examples and cuts the stream into rows of exactly ``length`` tokens
    (the tail that does not fill a row is dropped). Tokens of neighbouring examples attend to
    each other, as in transformers' ``group_texts``; labels keep each example's target mask."""
    ids = np.concatenate([ex["input_ids"] for ex in examples]) if examples else np.zeros(0, np.int32)
    labels = np.concatenate([ex["labels"] for ex in examples]) if examples else ids
    n = len(ids) // length
    return [{"input_ids": ids[i * length:(i + 1) * length],
             "labels": labels[i * length:(i + 1) * length]} for i in range(n)]
