import json

import pytest
from loraplex.adapters.package.template import PromptTemplate
from loraplex.trainer.dataset import (
    IGNORE_INDEX,
    DatasetError,
    collate,
    load_examples,
    read_records,
    split_indices,
)

TEMPLATE = PromptTemplate(prompt="Review: {text}\nSentiment:", completion=" {label}")
RECORDS = [{"text": "the movie was great", "label": "positive"}, {"text": "the book was dull", "label": "negative"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def test_json_array_and_jsonl_read_the_same(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert read_records(tmp_path / "a.json") == read_records(tmp_path / "a.jsonl") == RECORDS


def test_prompt_tokens_are_masked_and_eos_ends_the_completion(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    first = load_examples(tmp_path / "a.jsonl", TEMPLATE, tokenizer)[0]
    prompt_ids = tokenizer("Review: the movie was great\nSentiment:").input_ids
    completion_ids = tokenizer(" positive", add_special_tokens=False).input_ids
    assert first.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert first.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
    assert first.prompt_length == len(prompt_ids)
    assert tokenizer.decode(first.input_ids) == "Review: the movie was great\nSentiment: positive<|endoftext|>"
    batch = collate(load_examples(tmp_path / "a.jsonl", TEMPLATE, tokenizer), tokenizer.pad_token_id)
    # The shorter row is padded: pad tokens are masked out of attention and loss.
    lengths = batch["attention_mask"].sum(1).tolist()
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, lengths[short] :] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, lengths[short] :] == tokenizer.pad_token_id).all()


def test_missing_template_field_names_the_record_and_field(tmp_path, tokenizer):
    records = [*RECORDS, {"text": "the game was poor", "lable": "negative"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(DatasetError, match=r"a.jsonl: record 2 has no field 'label' .*\(record has: lable, text\)"):
        load_examples(tmp_path / "a.jsonl", TEMPLATE, tokenizer)


def test_bad_lines_and_records_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n\n{not json\n")
    with pytest.raises(DatasetError, match="bad.jsonl: line 3 is not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "list.json").write_text(json.dumps([RECORDS[0], ["text", "label"]]))
    with pytest.raises(DatasetError, match="list.json: record 1 is a list, expected an object"):
        read_records(tmp_path / "list.json")


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_dataset_is_rejected(tmp_path, content):
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(DatasetError, match="the dataset is empty"):
        read_records(tmp_path / "empty.jsonl")


def test_eval_split_is_deterministic_disjoint_and_keeps_training_data():
    train, held = split_indices(400, 0.1, seed=0)
    assert len(held) == 40 and len(train) == 360
    assert sorted(train + held) == list(range(400))
    assert split_indices(400, 0.1, seed=0) == (train, held)
    assert split_indices(400, 0.1, seed=1)[1] != held
    assert split_indices(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert len(split_indices(3, 0.1, seed=0)[1]) == 1  # at least one record is held out
    with pytest.raises(DatasetError, match=r"eval_split=0.5 holds out 1 of 1 records and leaves no training data"):
        split_indices(1, 0.5, seed=0, where="one.jsonl")


def test_shipped_demo_data_is_what_the_generator_writes():
    from loraplex.trainer.demo_tasks import DATA_DIR, TASKS, generate

    for task in TASKS:
        assert read_records(DATA_DIR / f"{task}.jsonl") == generate(task), "run python -m loraplex.trainer.demo_tasks"
