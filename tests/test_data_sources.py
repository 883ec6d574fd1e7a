"""lab.data sources beyond JSONL: parquet / csv / arrow files, save_to_disk folders, hf:ID:CONFIG[:SPLIT],
GSM8K-style rows without a "prompt" key, and the extra columns that reward functions receive."""

import csv
import json
import re
import time

import pytest

from lab.data import DataError, detect_format, load_rows, normalize_row, prompt_columns, split_hf_source, write_jsonl

pa = pytest.importorskip("pyarrow")
datasets = pytest.importorskip("datasets")

USER = {"role": "user", "content": "Is 2+2=4?"}
YES = {"role": "assistant", "content": "Yes."}
NO = {"role": "assistant", "content": "No."}
GSM8K = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A pen costs $2. What do 500 pens cost?", "answer": "2 * 500 = 1000\n#### 1,000"},
]


# ---- writers: the same rows in every file type -----------------------------------------------------------------


def write_parquet(path, rows):
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_arrow(path, rows):
    """The IPC stream format, as `datasets` writes its .arrow files."""
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def write_json_array(path, rows):
    path.write_text(json.dumps(rows))


def write_saved_dataset(path, rows):
    datasets.Dataset.from_list(rows).save_to_disk(str(path))


def write_saved_dict(path, rows):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))


WRITERS = {
    "x.jsonl": write_jsonl,
    "x.json": write_json_array,
    "x.parquet": write_parquet,
    "x.csv": write_csv,
    "x.arrow": write_arrow,
    "saved_dataset": write_saved_dataset,
    "saved_dict": write_saved_dict,
}
ROWS = {  # (rows on disk, format asked for, rows expected after normalization)
    "prompt_only": ([{"prompt": "2+3=", "id": "a"}], None, [{"prompt": "2+3=", "id": "a"}]),
    "gsm8k": (
        GSM8K,
        "prompt_only",
        [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in GSM8K],
    ),
    "sft": ([{"prompt": "2+3=", "completion": "5"}], "sft", [{"prompt": "2+3=", "completion": "5"}]),
    "preference": (
        [{"chosen": "Verdict: good", "rejected": "Verdict: bad"}],
        None,
        [{"prompt": "Verdict:", "chosen": " good", "rejected": " bad"}],
    ),
    "messages": ([{"messages": [USER, YES]}], "sft", [{"prompt": [USER], "completion": "Yes."}]),
    "chat_preference": (
        [{"prompt": [USER], "chosen": [YES], "rejected": [NO]}],
        None,
        [{"prompt": [USER], "chosen": "Yes.", "rejected": "No."}],
    ),
}


@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("prefix", ["", "hf:"])
def test_every_format_from_every_local_source(tmp_path, name, kind, prefix):
    """The same rows written as jsonl, a json array, parquet, csv, arrow, or a save_to_disk folder load to the same
    normalized rows, as a bare path and as hf:PATH. (csv has no nested values: message lists are skipped there.)"""
    on_disk, fmt, expected = ROWS[kind]
    if name == "x.csv" and kind in ("messages", "chat_preference"):
        pytest.skip("csv cells are strings, not message lists")
    path = tmp_path / name
    WRITERS[name](path, on_disk)
    rows = load_rows(f"{prefix}{path}", format=fmt)
    assert rows.rows == expected
    assert rows.source == f"{prefix}{path}"


@pytest.mark.parametrize("name", ["x.parquet", "x.csv", "x.arrow", "saved_dataset"])
def test_bad_row_of_a_table_names_row_and_file(tmp_path, name):
    """Row 2 has an empty "rejected": the message says row 2 and the file, like a JSON array's."""
    path = tmp_path / name
    WRITERS[name](
        path, [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": ""}]
    )
    expected = rf"^row 2 \({re.escape(str(path))}\): key 'rejected' must be a non-empty string, got an empty string$"
    with pytest.raises(DataError, match=expected):
        load_rows(str(path))


def test_saved_dataset_dict_takes_the_split(tmp_path):
    path = tmp_path / "gsm8k"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(GSM8K[:1]),
            "test": datasets.Dataset.from_list(GSM8K[1:]),
        }
    ).save_to_disk(str(path))
    assert load_rows(str(path))["prompt"] == [[{"role": "user", "content": GSM8K[0]["question"]}]]
    assert load_rows(str(path), split="test")["answer"] == [GSM8K[1]["answer"]]
    assert load_rows(f"hf:{path}:test")["answer"] == [GSM8K[1]["answer"]]  # a split in the source wins
    with pytest.raises(DataError, match=rf"^dataset folder {re.escape(str(path))} has splits train, test, not 'eval'$"):
        load_rows(str(path), split="eval")
    bad = [{"question": "q", "answer": "#### 1"}, {"question": "", "answer": "#### 2"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(bad)}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"row 2 \(.*bad split train\): key 'question' must be a non-empty string"):
        load_rows(str(tmp_path / "bad"))


def test_missing_and_unreadable_files(tmp_path):
    for source in (str(tmp_path / "nope.parquet"), f"hf:{tmp_path / 'nope.parquet'}", "hf:nope.csv"):
        with pytest.raises(DataError, match="^data file not found: .*nope"):
            load_rows(source)
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{re.escape(str(broken))} could not be read as parquet: "):
        load_rows(str(broken))


def test_csv_values_are_typed_like_datasets_csv(tmp_path):
    """pyarrow infers column types as `datasets`' csv loader does (a column of numbers is numbers), except the text
    columns of a format, which stay text (the SFT case above: completion "5" stays "5")."""
    path = tmp_path / "x.csv"
    path.write_text("question,answer\nWhat is 6*7?,42\nWhat is 1+1?,2\n")
    assert load_rows(str(path)).rows == [
        {"prompt": [{"role": "user", "content": "What is 6*7?"}], "answer": 42},
        {"prompt": [{"role": "user", "content": "What is 1+1?"}], "answer": 2},
    ]


# ---- hf:ID:CONFIG:SPLIT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rest, expected",
    [
        ("openai/gsm8k", ("openai/gsm8k", None, "train")),
        ("openai/gsm8k:main", ("openai/gsm8k", "main", "train")),  # not a split name -> a config
        ("org/prefs:test", ("org/prefs", None, "test")),
        ("org/prefs:validation", ("org/prefs", None, "validation")),
        (
            "HuggingFaceH4/ultrafeedback_binarized:train_prefs",
            ("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs"),
        ),
        ("org/x:train[:100]", ("org/x", None, "train[:100]")),  # the colon inside [...] is not a separator
        ("org/x:train+test", ("org/x", None, "train+test")),
        ("openai/gsm8k:main:test", ("openai/gsm8k", "main", "test")),
        ("openai/gsm8k:socratic:test[:10%]", ("openai/gsm8k", "socratic", "test[:10%]")),
        ("nyu-mll/glue:mnli:validation_matched", ("nyu-mll/glue", "mnli", "validation_matched")),
        ("org/x::test", ("org/x", None, "test")),
        ("org/x:trainer", ("org/x", "trainer", "train")),  # "train" must be followed by _ - [ + or nothing
    ],
)
def test_split_hf_source(rest, expected):
    assert split_hf_source(rest, "train") == expected


@pytest.mark.parametrize("rest", ["", ":main", "a:b:c:d", "a:main:"])
def test_split_hf_source_rejects(rest):
    with pytest.raises(DataError, match=r"is not hf:ID, hf:ID:SPLIT, hf:ID:CONFIG or hf:ID:CONFIG:SPLIT$"):
        split_hf_source(rest, "train")


def test_hf_config_and_split_reach_load_dataset(monkeypatch):
    calls = []

    def fake_load(dataset_id, split, **kwargs):
        calls.append((dataset_id, split, kwargs))
        return GSM8K

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_rows("hf:openai/gsm8k:main")
    assert rows.format == "prompt_only" and rows["answer"] == [r["answer"] for r in GSM8K]
    load_rows("hf:openai/gsm8k:main:test")
    load_rows("hf:openai/gsm8k", split="test")
    assert calls == [
        ("openai/gsm8k", "train", {"name": "main"}),
        ("openai/gsm8k", "test", {"name": "main"}),
        ("openai/gsm8k", "test", {}),
    ]


def test_hf_missing_config_hint(monkeypatch):
    def needs_config(dataset_id, split, **kwargs):
        raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['main', 'socratic']")

    monkeypatch.setattr(datasets, "load_dataset", needs_config)
    with pytest.raises(DataError) as info:
        load_rows("hf:openai/gsm8k")
    assert str(info.value) == (
        "dataset 'openai/gsm8k' could not be loaded: Config name is missing; "
        "name a config as hf:ID:CONFIG or hf:ID:CONFIG:SPLIT"
    )


def test_hf_offline_with_config_is_fast_and_one_line(monkeypatch):
    """The real `datasets` under HF_HUB_OFFLINE=1 (set by conftest): no network, a one-line error in seconds."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_rows("hf:openai/gsm8k:main")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert message.startswith("dataset 'openai/gsm8k' could not be reached (") and "\n" not in message
    assert "jsonl:PATH" in message


# ---- GSM8K / MATH rows and extra columns -----------------------------------------------------------------------


def test_question_or_problem_is_the_prompt_of_prompt_only_rows():
    assert detect_format(GSM8K[0]) == "prompt_only"
    # a bare question becomes the user's turn, so an instruct model answers it through its chat template
    assert normalize_row(GSM8K[0]) == {
        "prompt": [{"role": "user", "content": GSM8K[0]["question"]}],
        "answer": "3 + 4 = 7\n#### 7",
    }
    assert normalize_row({"problem": "Find x.", "solution": r"x = \boxed{2}"}, "prompt") == {
        "prompt": [{"role": "user", "content": "Find x."}],
        "solution": r"x = \boxed{2}",
    }
    # an explicit prompt wins, and the question is then just a column
    assert normalize_row({"prompt": "p", "question": "q"}) == {"prompt": "p", "question": "q"}
    # conversational questions are fine too
    assert normalize_row({"question": [USER], "answer": "4"}) == {"prompt": [USER], "answer": "4"}


def test_question_rows_errors_name_the_question_key():
    with pytest.raises(DataError, match=r"^row 3: key 'question' must be a non-empty string or a list of messages"):
        normalize_row({"question": "  ", "answer": "1"}, index=3)
    # for SFT a question is not enough: the row needs prompt + completion
    with pytest.raises(DataError, match="key 'prompt' is missing"):
        normalize_row(GSM8K[0], "sft")


def test_prompt_columns_are_aligned_lists():
    """Every key but the prompt becomes a column; a row that lacks a key gets None there."""
    rows = [{"prompt": "a", "answer": "1", "id": 0}, {"prompt": "b", "answer": "2"}]
    assert prompt_columns(rows) == {"answer": ["1", "2"], "id": [0, None]}
    assert prompt_columns([{"prompt": "a"}, {"prompt": "b"}]) == {}
    assert prompt_columns([]) == {}


def test_extra_columns_survive_loading(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    rows = load_rows(str(path), format="prompt_only")
    assert prompt_columns(rows) == {"answer": [r["answer"] for r in GSM8K]}
