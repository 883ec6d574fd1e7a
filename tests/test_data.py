"""lab.data: format detection, normalization, implicit prompts, bad-row messages, sources."""

import re
import sys
import types

import pytest

from lab.data import (
    DataError,
    Rows,
    detect_format,
    load_rows,
    normalize_row,
    split_implicit_prompt,
    validate_row,
    write_jsonl,
)

USER = {"role": "user", "content": "Is 2+2=4?"}
YES = {"role": "assistant", "content": "Yes."}
NO = {"role": "assistant", "content": "No."}


# ---- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "p"}, "prompt_only"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
        ({"chosen": "p a", "rejected": "p b"}, "preference"),
        ({"messages": [USER, YES]}, "conversational"),
        ({"prompt": [USER], "completion": [YES]}, "prompt_completion"),
        ({"chosen": "x"}, "preference"),  # half a pair: detected so the missing key can be named
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row) == expected


def test_detect_format_unknown_keys():
    with pytest.raises(DataError, match=r"cannot tell the format from keys \['text'\]"):
        detect_format({"text": "hello"})


def test_normalize_keeps_plain_rows_and_extra_columns():
    assert normalize_row({"prompt": "2+3=", "answer": "5"}) == {"prompt": "2+3=", "answer": "5"}
    assert normalize_row({"prompt": "a", "completion": "b"}, "sft") == {"prompt": "a", "completion": "b"}
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "id": 7}
    assert normalize_row(row, "preference") == row


def test_normalize_conversational_values_become_content_strings():
    row = {"prompt": [USER], "completion": [YES]}
    assert normalize_row(row) == {"prompt": [USER], "completion": "Yes."}
    row = {"prompt": [USER], "chosen": [YES], "rejected": [NO]}
    assert normalize_row(row) == {"prompt": [USER], "chosen": "Yes.", "rejected": "No."}


def test_messages_to_sft_and_prompt_only():
    system = {"role": "system", "content": "Be brief."}
    row = {"messages": [system, USER, YES], "id": 1}
    assert normalize_row(row, "prompt_completion") == {"prompt": [system, USER], "completion": "Yes.", "id": 1}
    assert normalize_row(row, "prompt_only") == {"prompt": [system, USER], "id": 1}
    # prompt_only of a conversation that ends with the user keeps every message
    assert normalize_row({"messages": [USER]}, "prompt_only") == {"prompt": [USER]}
    # asked for as conversational, the messages stay as they are
    assert normalize_row(row) == row


def test_messages_to_sft_needs_final_assistant_turn():
    message = "row 4: key 'messages' must end with an assistant message, but ends with role 'user'"
    with pytest.raises(DataError, match=message):
        normalize_row({"messages": [USER]}, "sft", index=4)
    with pytest.raises(DataError, match="key 'messages' needs at least one message before the last assistant"):
        normalize_row({"messages": [YES]}, "sft", index=1)


def test_unknown_format_name():
    with pytest.raises(DataError, match="unknown data format 'kto'"):
        normalize_row({"prompt": "p"}, "kto")


# ---- implicit prompts ---------------------------------------------------------------------------


def test_implicit_prompt_strings_cut_at_last_whitespace():
    """Common prefix 'The movie was gr' is cut back to its last space: prompt 'The movie was',
    and the space goes with the completions."""
    assert split_implicit_prompt("The movie was great", "The movie was gross") == ("The movie was", " great", " gross")
    # one completion a prefix of the other: common prefix 'Q: 2+2= 4' -> cut at the space before '4'
    assert split_implicit_prompt("Q: 2+2= 4", "Q: 2+2= 42") == ("Q: 2+2=", " 4", " 42")
    # a run of whitespace goes with the completions as a whole
    assert split_implicit_prompt("Answer:  yes", "Answer:  no") == ("Answer:", "  yes", "  no")


def test_implicit_prompt_row_normalized_to_explicit():
    row = {"chosen": "Review: fine film. Verdict: good", "rejected": "Review: fine film. Verdict: bad", "id": 2}
    assert normalize_row(row) == {
        "prompt": "Review: fine film. Verdict:",
        "chosen": " good",
        "rejected": " bad",
        "id": 2,
    }


def test_implicit_prompt_messages():
    row = {"chosen": [USER, YES], "rejected": [USER, NO]}
    assert normalize_row(row) == {"prompt": [USER], "chosen": "Yes.", "rejected": "No."}


@pytest.mark.parametrize(
    "chosen, rejected, message",
    [
        ("2+2=4", "2+2=5", "no common prompt ending at a word boundary"),
        ("yes", "no", "no common prompt"),
        ("same text", "same text", "are identical"),
        ([USER, YES], [{"role": "user", "content": "other"}, NO], "no common prompt: their messages before"),
        ([YES], [NO], "each holds only an assistant message"),
        ("text", [USER, NO], "both be strings or both be message lists"),
    ],
)
def test_implicit_prompt_without_common_prefix_raises(chosen, rejected, message):
    with pytest.raises(DataError, match=message) as info:
        validate_row({"chosen": chosen, "rejected": rejected}, 9, None, "line 9 of p.jsonl")
    assert str(info.value).startswith("row 9 (line 9 of p.jsonl): ")
    assert "'chosen'" in str(info.value) or "'rejected'" in str(info.value)


# ---- bad rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, fmt, message",
    [
        ({"prompt": "p", "rejected": "b"}, "preference", "key 'chosen' is missing"),
        (
            {"prompt": "p", "chosen": "a", "rejected": 3},
            "preference",
            "key 'rejected' must be a non-empty string, got int",
        ),
        (
            {"prompt": "p", "chosen": "  ", "rejected": "b"},
            "preference",
            "key 'chosen' must be a non-empty string, got an empty string",
        ),
        (
            {"prompt": None, "completion": "c"},
            "sft",
            "key 'prompt' must be a non-empty string or a list of messages, got null",
        ),
        ({"prompt": "p"}, "prompt_completion", "key 'completion' is missing"),
        ({"prompt": "p", "completion": "c"}, "preference", "key 'chosen' is missing"),
        ({"messages": [{"role": "user"}]}, None, r"key 'messages\[0\].content' is missing"),
        (
            {"messages": [{"role": "user", "content": 5}]},
            None,
            r"key 'messages\[0\].content' must be a string, got int",
        ),
        ({"messages": []}, None, "key 'messages' must be a non-empty list of messages, got an empty list"),
        ({"prompt": [USER], "completion": [YES, NO]}, None, "key 'completion' must hold a single assistant message"),
        (["not", "a", "dict"], None, "expected a JSON object with keys such as 'prompt', got list"),
    ],
)
def test_bad_row_message_names_row_and_key(row, fmt, message):
    with pytest.raises(DataError, match=message) as info:
        validate_row(row, 17, fmt, "line 17 of prefs.jsonl")
    assert str(info.value).startswith("row 17 (line 17 of prefs.jsonl): ")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ---- files --------------------------------------------------------------------------------------


def test_jsonl_round_trip_and_rows_api(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i} é"} for i in range(3)]
    path = write_jsonl(tmp_path / "sub" / "sft.jsonl", rows)
    for source in (f"jsonl:{path}", str(path)):
        rows = load_rows(source)
        assert isinstance(rows, Rows)
        assert rows.format == "prompt_completion" and rows.skipped == 0 and rows.source == source
        assert len(rows) == 3
        assert rows[1] == {"prompt": "p1", "completion": "c1 é"}
        assert [r["prompt"] for r in rows] == ["p0", "p1", "p2"]
        assert rows["completion"] == ["c0 é", "c1 é", "c2 é"]
        assert rows[:2] == rows.rows[:2]


def test_requested_format_converts_or_rejects(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [USER, YES]}])
    assert load_rows(str(path)).rows == [{"messages": [USER, YES]}]
    assert load_rows(str(path), format="sft").rows == [{"prompt": [USER], "completion": "Yes."}]
    assert load_rows(str(path), format="prompt-only").rows == [{"prompt": [USER]}]
    with pytest.raises(DataError, match=rf"row 1 \(line 1 of {re.escape(str(path))}\): key 'chosen' is missing"):
        load_rows(str(path), format="preference")


def test_json_array_file(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]')
    with pytest.raises(DataError, match=rf"row 2 \({re.escape(str(path))}\): key 'rejected' is missing"):
        load_rows(str(path))


def test_invalid_json_line_named_by_line_number(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n\n{"prompt": "p", "completion": \n')
    # the blank line 2 is not a row, so the broken line 3 is row 2
    expected = rf"^row 2 \(line 3 of {re.escape(str(path))}\): invalid JSON \(Expecting value at column 31\)$"
    with pytest.raises(DataError, match=expected):
        load_rows(str(path))


def test_non_object_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"row 2 \(line 2 of .*p.jsonl\): expected a JSON object .* got list"):
        load_rows(str(path))


def test_mixed_formats_without_requested_format(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a"}, {"prompt": "b", "completion": "c"}])
    expected = r"row 2 .*are in format 'prompt_completion', but the rows before are 'prompt_only'"
    with pytest.raises(DataError, match=expected):
        load_rows(str(path))
    # asked for prompts only, the completion column is simply not used
    assert load_rows(str(path), format="prompt_only")["prompt"] == ["a", "b"]


def test_skip_bad_rows_counts_and_warns_once(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    lines = [good, '{"prompt": "p", "chosen": "a"}', "{oops", good, '{"prompt": "p", "chosen": 1, "rejected": "b"}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 3 bad row\(s\) of .*prefs.jsonl; first: row 2 \(line 2") as record:
        rows = load_rows(str(path), skip_bad_rows=True)
    assert len(record) == 1
    assert rows.skipped == 3 and len(rows) == 2 and rows.format == "preference"


def test_all_rows_bad_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("{oops\n")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable rows"):
        load_rows(str(path), skip_bad_rows=True)


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    expected = (
        r"unknown data source 'nope': use .*\.parquet.* jsonl:PATH, hf:ID\[:SPLIT\], hf:ID:CONFIG.* task \(.*arith"
    )
    with pytest.raises(DataError, match=expected):
        load_rows("nope")


# ---- Hugging Face sources (never touch the network) -------------------------------------------


def test_hf_offline_gives_one_line_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'org/prefs' on the Hub (LocalEntryNotFoundError)\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_rows("hf:org/prefs")
    message = str(info.value)
    assert "\n" not in message
    assert "dataset 'org/prefs' could not be reached (ConnectionError)" in message
    assert "arith" in message and "jsonl:PATH" in message
    assert calls == [(("org/prefs",), {"split": "train"})]


def test_hf_rows_and_split_from_source(monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake_load(dataset_id, split):
        seen.update(dataset_id=dataset_id, split=split)
        return [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": ""}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    expected = r"row 2 \(hf:org/prefs:test split test\): key 'rejected' must be a non-empty string"
    with pytest.raises(DataError, match=expected):
        load_rows("hf:org/prefs:test")
    assert seen == {"dataset_id": "org/prefs", "split": "test"}
    with pytest.warns(UserWarning):
        assert len(load_rows("hf:org/prefs", split="validation", skip_bad_rows=True)) == 1
    assert seen["split"] == "validation"


# ---- built-in tasks (a stand-in registry, so these tests do not depend on the real tasks) ------


class FakeTask:
    name, kind, model, max_new_tokens = "toy", "verifiable", "toy", 4

    def train_prompts(self):
        return ["1+1=", "2+2="]

    def eval_prompts(self):
        return ["3+3="]

    def sft_rows(self, split="train"):
        return [{"prompt": "1+1=", "completion": "2"}] if split == "train" else [{"prompt": "3+3=", "completion": "6"}]

    def preference_rows(self, split="train"):
        raise NotImplementedError


@pytest.fixture
def fake_tasks(monkeypatch):
    module = types.ModuleType("lab.tasks")
    module.TASKS = {"toy": FakeTask()}
    module.get_task = lambda name: module.TASKS[name]
    monkeypatch.setitem(sys.modules, "lab.tasks", module)


def test_task_source_delegates_by_format(fake_tasks):
    assert load_rows("toy").rows == [{"prompt": "1+1="}, {"prompt": "2+2="}]
    assert load_rows("toy", split="eval")["prompt"] == ["3+3="]
    rows = load_rows("toy", format="sft", split="eval")
    assert rows.format == "prompt_completion" and rows.rows == [{"prompt": "3+3=", "completion": "6"}]
    with pytest.raises(DataError, match="task 'toy' has no preference rows"):
        load_rows("toy", format="preference")
    with pytest.raises(DataError, match=r"unknown data source 'arith'.*built-in task \(toy\)"):
        load_rows("arith")  # names come from the registry, not a fixed list


def test_unique_prompts_handles_conversational_prompts():
    """Message-list prompts are unhashable; unique_prompts keeps first-seen order like dict.fromkeys would."""
    from lab.data import unique_prompts

    chat = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": "a"}, {"prompt": chat}, {"prompt": "a"}, {"prompt": [dict(m) for m in chat]}, {"prompt": "b"}]
    assert unique_prompts(rows) == ["a", chat, "b"]
