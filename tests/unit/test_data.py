"""Shipped data, JSONL loading, label masking, padding and packing."""

import json

import pytest

from llmopt.data import (
    BUILTIN_DIR,
    IGNORE_INDEX,
    DatasetError,
    encode_example,
    generate_task,
    load_rows,
    pack_examples,
    pad_batch,
    render,
    write_task,
)
from llmopt.models import load_tokenizer

TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def test_shipped_dataset_is_exactly_what_the_generator_writes(tmp_path):
    write_task("reverse", tmp_path)
    for split in ("train", "test"):
        shipped = (BUILTIN_DIR / f"reverse.{split}.jsonl").read_bytes()
        assert (tmp_path / f"reverse.{split}.jsonl").read_bytes() == shipped


def test_reverse_dataset_is_correct_and_splits_are_disjoint():
    train, test = load_rows("reverse", "train"), load_rows("reverse", "test")
    assert (len(train), len(test)) == (3000, 300)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for row in train[:100] + test:
        digits = row["prompt"].rsplit(" ", 1)[1]
        assert row["response"] == digits[::-1]


@pytest.mark.parametrize("task", ["sort", "add"])
def test_other_tasks_have_exact_answers(task):
    rows = generate_task(task, num_train=50, num_test=10, seed=3)["train"]
    for row in rows:
        operand = row["prompt"].split(": ", 1)[1]
        expected = "".join(sorted(operand)) if task == "sort" else str(eval(operand))  # digits and '+'
        assert row["response"] == expected


def test_local_jsonl_prompt_response_and_chat(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"prompt": "p", "response": "r"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_rows(str(path)) == rows
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert load_rows(str(tmp_path), "train") == rows[:1]
    assert load_rows("reverse", "test", limit=7)[-1] == load_rows("reverse", "test")[6]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "bad.jsonl:2: invalid JSON"),
        ('{"prompt": "p"}', "need string 'prompt' and 'response'"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant"),
        ('{"messages": [{"role": "robot", "content": "q"}]}', "messages[0] must be"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_malformed_rows_name_file_line_and_problem(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "response": "ok"}\n' + line + "\n")
    with pytest.raises(DatasetError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_rows(str(path))


def test_unknown_dataset_error_names_the_field():
    with pytest.raises(DatasetError, match=r"fix data\.dataset"):
        load_rows("no-such-dataset")


def test_prompt_tokens_are_masked_and_response_plus_eos_is_learned(tokenizer):
    row = {"prompt": "Reverse the digits: 1234", "response": "4321"}
    ex = encode_example(row, tokenizer, TEMPLATE, max_length=64)
    prompt_text, _ = render(row, tokenizer, TEMPLATE)
    n_prompt = len(tokenizer.encode(prompt_text, add_special_tokens=False)) + 1  # + BOS
    assert ex["input_ids"][0] == tokenizer.bos_token_id
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    learned = ex["labels"][n_prompt:]
    assert IGNORE_INDEX not in learned
    assert learned[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(learned[:-1]) == "4321"
    assert ex["input_ids"][n_prompt:] == learned
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
    unmasked = encode_example(row, tokenizer, TEMPLATE, max_length=64, mask_prompt=False)
    assert unmasked["labels"] == unmasked["input_ids"]
    cut = encode_example(row, tokenizer, TEMPLATE, max_length=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and cut["labels"][-2:] == learned[:2]


def test_chat_rows_mask_everything_but_the_last_assistant_turn(tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "Reverse the digits: 12"},
            {"role": "assistant", "content": "21"},
        ]
    }
    ex = encode_example(row, tokenizer, TEMPLATE, max_length=64)
    learned = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned, skip_special_tokens=True) == "21"
    prompt, _ = render(row, tokenizer, TEMPLATE)
    assert prompt.endswith("<|assistant|>\n")


def test_pad_batch_right_and_left(tokenizer):
    a = encode_example({"prompt": "a", "response": "1"}, tokenizer, TEMPLATE, 64)
    b = encode_example({"prompt": "a much longer prompt", "response": "12345"}, tokenizer, TEMPLATE, 64)
    right = pad_batch([a, b], tokenizer.pad_token_id)
    gap = len(b["input_ids"]) - len(a["input_ids"])
    assert right["input_ids"].shape == (2, len(b["input_ids"]))
    assert right["attention_mask"][0].tolist() == [1] * len(a["input_ids"]) + [0] * gap
    assert right["labels"][0, -gap:].tolist() == [IGNORE_INDEX] * gap
    left = pad_batch([a, b], tokenizer.pad_token_id, padding_side="left")
    assert left["input_ids"][0, :gap].tolist() == [tokenizer.pad_token_id] * gap
    assert left["input_ids"][0, gap:].tolist() == a["input_ids"]


def test_packing_keeps_every_token_and_restarts_positions(tokenizer):
    rows = load_rows("reverse", "train", limit=20)
    encoded = [encode_example(r, tokenizer, TEMPLATE, 64) for r in rows]
    blocks = pack_examples(encoded, max_length=64)
    assert len(blocks) < len(encoded)
    assert all(len(b["input_ids"]) <= 64 for b in blocks)
    assert [t for b in blocks for t in b["input_ids"]] == [t for e in encoded for t in e["input_ids"]]
    assert [t for b in blocks for t in b["labels"]] == [t for e in encoded for t in e["labels"]]
    first = blocks[0]["position_ids"]
    n0 = len(encoded[0]["input_ids"])
    assert first[:n0] == list(range(n0)) and first[n0] == 0
    batch = pad_batch(blocks[:2], tokenizer.pad_token_id)
    assert "position_ids" in batch
