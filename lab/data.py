"""Datasets in the formats TRL users know: JSONL files, Hugging Face datasets, built-in tasks.

Formats, told apart by their keys:

    prompt_only        {"prompt"}                          prompts for online RL (PPO, GRPO, ...)
    prompt_completion  {"prompt", "completion"}            SFT pairs
    preference         {"prompt", "chosen", "rejected"}    reward model / DPO pairs (explicit prompt)
                       {"chosen", "rejected"}              same, implicit prompt (see `split_implicit_prompt`)
    conversational     {"messages": [{"role", "content"}, ...]}

Like TRL's "conversational" type, the values of prompt / completion / chosen / rejected may also be
message lists instead of strings. Other keys (an "answer" column, an "id") are kept as they are: they are
the extra columns that reward functions receive as keyword arguments (see `prompt_columns`).

Math datasets name their prompt differently: GSM8K rows are {"question", "answer": "... #### 42"} and MATH
rows {"problem", "solution"}. A row with no "prompt" key (and no "messages") takes its prompt from
"question", else "problem", for prompt-only use, as the user's turn of a conversation
([{"role": "user", "content": question}], so an instruct model sees it through its chat template); the other
columns ("answer", "solution") stay as extra columns. TRL needs such rows mapped to "prompt" first; the lab
accepts them as they are.

What a method receives after `normalize_row`:
- `prompt` is a non-empty string or a non-empty list of messages (`sampling.format_prompt` renders a
  message list with the tokenizer's chat template);
- `completion`, `chosen` and `rejected` are always non-empty strings: the text the model should write
  after the prompt. A conversational completion is reduced to its assistant message's content, so
  every trainer tokenizes completions the same way.

Bad rows raise `DataError` naming the row and the key:

    row 17 (line 17 of prefs.jsonl): key 'chosen' is missing

Besides the keys' types, a row is refused when its pair teaches nothing (chosen == rejected) or a message has a role
other than system, user, assistant or tool. A text longer than `MAX_TEXT_CHARS` characters is cut when it is loaded
(prompts keep their end, completions their start, as token truncation does later), so one 10 MB line cannot stall
a step in the tokenizer; `Rows.cut` counts the cut values.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.errors import UserError

FORMATS = ("prompt_only", "prompt_completion", "preference", "conversational")

# Other spellings a user or a method may pass for `format`.
_ALIASES = {
    "prompt": "prompt_only",
    "prompts": "prompt_only",
    "sft": "prompt_completion",
    "pref": "preference",
    "preferences": "preference",
    "messages": "conversational",
}

# Keys that belong to a format; any other key in a row is an extra column and passes through.
_FORMAT_KEYS = ("prompt", "completion", "chosen", "rejected", "messages")

# Where a prompt-only row without "prompt" finds its prompt, in this order (GSM8K, MATH).
PROMPT_ALIASES = ("question", "problem")

# Split names of `datasets`: in "hf:ID:X", X is a split when it is one of these, alone or followed by a
# suffix that starts with _ - [ or + (train_prefs, validation_matched, test[:10%], train+test); else a config.
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")

# File types read without `datasets` (pyarrow for the binary and csv ones; `datasets` depends on it).
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")

# The roles chat templates know (tool: a tool call's result, in templates that support tools).
ROLES = ("system", "user", "assistant", "tool")

# Longest text value kept, in characters: 4 characters a token (the usual English BPE average) × 65536, the largest
# max_length any config accepts. Token truncation to max_length happens later, at batching; this cut only bounds
# what the tokenizer has to read (a 10 MB line took minutes).
MAX_TEXT_CHARS = 4 * 65536

# Bad rows skipped under skip_bad_rows, per thread and load, until a run records them (`take_skipped_rows`).
_skipped = threading.local()


class DataError(UserError, ValueError):
    """A data source or row that cannot be used. The message is one line naming the row and the key."""


@dataclass
class Rows:
    """Normalized rows of one source, all in one format.

    Indexing with an int or a slice gives rows; indexing with a key gives that column as a list,
    like a `datasets.Dataset`.
    """

    rows: list[dict]
    format: str
    skipped: int = 0  # bad rows dropped because of skip_bad_rows=True
    source: str = ""
    cut: int = 0  # text values cut to MAX_TEXT_CHARS

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, key: int | slice | str):
        if isinstance(key, str):
            return [row[key] for row in self.rows]
        return self.rows[key]


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def canonical_format(name: str) -> str:
    """'prompt-only', 'sft', 'preference', ... -> one of FORMATS; DataError for anything else."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise DataError(f"unknown data format '{name}': expected one of {', '.join(FORMATS)}")
    return key


def detect_format(row: Any) -> str:
    """The format a row's keys say it is in.

    A row with only one of a pair ("chosen" without "rejected", "completion" without "prompt") is
    detected as that pair's format, so validation then reports the missing key by name.
    """
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {_kind(row)}")
    keys = set(row)
    if keys & {"chosen", "rejected"}:
        return "preference"
    if "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt_only"
    if "messages" in keys:
        return "conversational"
    if keys & set(PROMPT_ALIASES):
        return "prompt_only"  # GSM8K / MATH rows: the question is the prompt
    raise DataError(
        f"cannot tell the format from keys {sorted(keys)}: expected 'prompt', 'prompt'+'completion', "
        "'chosen'+'rejected' (with or without 'prompt'), 'messages', or 'question' / 'problem' for prompts"
    )


def validate_row(row: Any, index: int, format: str | None, where: str = "") -> None:
    """Raise DataError if `row` cannot be used in `format` (None: the format its keys say).

    `index` is the 1-based row number and `where` says where the row came from
    ("line 17 of prefs.jsonl"); both go into the message. Validation and normalization are one
    pass, so anything `normalize_row` would reject is rejected here too.
    """
    normalize_row(row, format, index=index, where=where)


def normalize_row(row: Any, format: str | None = None, *, index: int | None = None, where: str = "") -> dict:
    """Validate `row` and return it in the normalized shape of `format` (see the module docstring).

    - implicit-prompt preference {"chosen", "rejected"} -> explicit {"prompt", "chosen", "rejected"};
    - {"messages"} asked for as prompt_completion -> prompt = all messages before the last assistant
      message, completion = that message's content;
    - {"messages"} asked for as prompt_only -> prompt = the messages without a final assistant turn;
    - {"question", ...} or {"problem", ...} asked for as prompt_only (no "prompt" key) -> prompt = that
      value as a user turn, every other key an extra column:
      {"question": q, "answer": a} -> {"prompt": [{"role": "user", "content": q}], "answer": a}.
    """
    loc = _location(index, where)
    if not isinstance(row, dict):
        raise DataError(f"{loc}expected a JSON object with keys such as 'prompt', got {_kind(row)}")
    try:
        fmt = canonical_format(format) if format is not None else detect_format(row)
    except DataError as err:
        raise DataError(f"{loc}{err}") from None
    extras = {key: value for key, value in row.items() if key not in _FORMAT_KEYS}

    if fmt == "conversational":
        return {"messages": _messages(row, "messages", loc), **extras}

    if fmt == "preference":
        if "prompt" in row:
            prompt = _prompt(row, loc)
            chosen = _completion(row, "chosen", loc)
            rejected = _completion(row, "rejected", loc)
        else:
            chosen = _required(row, "chosen", loc)
            rejected = _required(row, "rejected", loc)
            if not isinstance(chosen, list):
                _text(chosen, "chosen", loc)  # a wrong type gets the same message as with a prompt
            if not isinstance(rejected, list):
                _text(rejected, "rejected", loc)
            try:
                prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
            except DataError as err:
                raise DataError(f"{loc}{err}") from None
        if chosen == rejected:
            raise DataError(f"{loc}keys 'chosen' and 'rejected' are identical: the pair prefers nothing")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extras}

    # prompt_only / prompt_completion, from explicit keys or from a conversation
    if "prompt" not in row and "messages" in row:
        messages = _messages(row, "messages", loc)
        if fmt == "prompt_only":
            prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            if not prompt:
                raise DataError(f"{loc}key 'messages' holds no prompt, only an assistant message")
            return {"prompt": prompt, **extras}
        prompt, completion = _split_last_assistant(messages, "messages", loc)
        if not prompt:
            raise DataError(f"{loc}key 'messages' needs at least one message before the last assistant message")
        return {"prompt": prompt, "completion": completion, **extras}

    if fmt == "prompt_only" and "prompt" not in row:
        alias = next((key for key in PROMPT_ALIASES if key in row), None)
        if alias is not None:
            extras.pop(alias)  # renamed to "prompt", not kept twice
            question = _prompt(row, loc, key=alias)
            # a bare problem statement is the user's turn: an instruct model answers it through its chat template
            # (TRL's GSM8K recipes map it the same way); a model without a template gets a one-line error
            prompt = [{"role": "user", "content": question}] if isinstance(question, str) else question
            return {"prompt": prompt, **extras}
    prompt = _prompt(row, loc)
    if fmt == "prompt_only":
        return {"prompt": prompt, **extras}
    return {"prompt": prompt, "completion": _completion(row, "completion", loc), **extras}


def split_implicit_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str, str]:
    """Split a preference pair that has no "prompt" key into (prompt, chosen, rejected).

    The rule:
    - message lists: the prompt is every message before the last one. Those messages must be the
      same in both lists, and the last message of each must be an assistant message; chosen and
      rejected become the content of those assistant messages.
    - strings: take the longest common prefix of chosen and rejected and cut it back to its last
      whitespace, so a word is never split ("The movie was gr|eat" -> "The movie was"). The
      whitespace goes with the completions (" great", " gross"), because BPE tokenizers attach a
      leading space to the next word: " great" is then tokenized the way the model would write it.

    Raises DataError when there is no common prompt (e.g. "2+2=4" vs "2+2=5": no whitespace to cut
    at; give such rows an explicit "prompt"), or when the pair is identical.
    """
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError("keys 'chosen' and 'rejected' must both be strings or both be message lists")

    if isinstance(chosen, list):
        prompt_c, chosen_text = _split_last_assistant(_check_messages(chosen, "chosen", ""), "chosen", "")
        prompt_r, rejected_text = _split_last_assistant(_check_messages(rejected, "rejected", ""), "rejected", "")
        if prompt_c != prompt_r:
            raise DataError(
                "keys 'chosen' and 'rejected' have no common prompt: their messages before the last "
                "assistant message differ"
            )
        if not prompt_c:
            raise DataError("keys 'chosen' and 'rejected' have no common prompt: each holds only an assistant message")
        return prompt_c, chosen_text, rejected_text

    if chosen == rejected:
        raise DataError("keys 'chosen' and 'rejected' are identical")
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    prefix = chosen[:common]
    last_space = max((i for i, ch in enumerate(prefix) if ch.isspace()), default=-1)
    prompt = prefix[: last_space + 1].rstrip()
    if not prompt:
        raise DataError(
            f"keys 'chosen' and 'rejected' have no common prompt ending at a word boundary "
            f"(common prefix {prefix[:40]!r}); add an explicit 'prompt' key"
        )
    chosen_text, rejected_text = chosen[len(prompt) :], rejected[len(prompt) :]
    for key, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        if not text.strip():
            raise DataError(f"key '{key}' has no text after the common prompt {prompt!r}")
    return prompt, chosen_text, rejected_text


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def is_data_source(name: str) -> bool:
    """Whether a ``task`` value names data rather than a built-in task: ``jsonl:``/``hf:`` prefixes, a data file
    suffix, or an existing path. Anything else is a task name, checked against the registered tasks."""
    name = str(name)
    return name.startswith(("jsonl:", "hf:")) or name.lower().endswith(FILE_SUFFIXES) or os.path.exists(name)


def load_rows(source: str, *, format: str | None = None, split: str = "train", skip_bad_rows: bool = False) -> Rows:
    """Load and normalize the rows of a data source.

    `source` is one of:
    - a local file: "jsonl:PATH", or a path ending in .jsonl / .json (a .json file may hold a JSON
      array of objects or JSON Lines), .parquet, .csv or .arrow;
    - a local folder: one written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict whose
      `split` is taken), or any folder `datasets.load_dataset` can read (parquet / json / csv files);
    - "hf:ID", "hf:ID:SPLIT", "hf:ID:CONFIG" or "hf:ID:CONFIG:SPLIT": `datasets.load_dataset(ID, CONFIG,
      split=SPLIT)`. With one part after ID, the part is a SPLIT when it starts with a split name of
      `datasets` (train, test, validation, valid, dev, eval: train_prefs, test[:10%], train+test ...)
      and a CONFIG otherwise: hf:openai/gsm8k:main is config "main", split `split`. A SPLIT in the
      source overrides `split`. ID may also be a local file or folder as above (hf:data/gsm8k.parquet);
    - a built-in task name: rows come from the task. `format` picks which rows:
      prompt_only (the default) -> train_prompts() / eval_prompts() for split "train" / "eval",
      prompt_completion -> sft_rows(split), preference -> preference_rows(split).

    A single file or a saved Dataset has one split: `split` applies to DatasetDict folders and hub datasets.
    `format` None means: the format the first usable row's keys say, and every row must agree.
    A bad row raises DataError; with skip_bad_rows=True bad rows are dropped, counted in
    `Rows.skipped`, and one warning gives the count.
    """
    fmt = canonical_format(format) if format is not None else None
    source = str(source)

    if source.startswith("hf:"):
        records = _read_hf(source[3:], split, source)
    elif source.startswith("jsonl:"):
        records = _read_file(source[len("jsonl:") :])
    elif source.lower().endswith(FILE_SUFFIXES):
        records = _read_local(source, None, split)
    elif source in task_names():
        return _note_skipped(_load_task(source, fmt, split, skip_bad_rows), split)
    elif os.path.isdir(source):
        records = _read_local(source, None, split)
    else:
        raise DataError(
            f"unknown data source '{source}': use a .jsonl/.json/.parquet/.csv file, a dataset folder, "
            f"jsonl:PATH, hf:ID[:SPLIT], hf:ID:CONFIG[:SPLIT], or a built-in task ({', '.join(task_names())})"
        )
    return _note_skipped(_collect(records, fmt, source, skip_bad_rows), split)


def load_preference_rows(cfg, split: str = "train") -> list[dict]:
    """{prompt, chosen, rejected, ...} rows of ``cfg.task`` (a built-in task's pairs, or a file / hub dataset), for
    the reward model, DPO and SFT on preferred answers."""
    return list(load_rows(cfg.task, format="preference", split=split, skip_bad_rows=cfg.skip_bad_rows))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSON Lines (UTF-8, one object per line), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def task_names() -> list[str]:
    """Names of the registered tasks; imported lazily so loading a file never imports the tasks."""
    from lab.tasks import TASKS

    return list(TASKS)


# A record is (row number, where it came from, parsed value or the DataError that parsing raised).
Record = tuple[int, str, Any]


def _collect(records: Iterable[Record], fmt: str | None, source: str, skip_bad_rows: bool) -> Rows:
    """Normalize every record; raise on the first bad one, or skip and count them."""
    detect = fmt is None
    rows: list[dict] = []
    errors: list[DataError] = []
    cut = 0
    for index, where, value in records:
        try:
            if isinstance(value, DataError):
                raise value
            row = normalize_row(value, None if detect else fmt, index=index, where=where)
            if detect:
                # The first usable row fixes the format. A later row with other keys is an error
                # rather than being silently cut down to the first row's format.
                row_format = detect_format(value)
                if fmt is None:
                    fmt = row_format
                elif row_format != fmt:
                    raise DataError(
                        f"{_location(index, where)}keys {sorted(value)} are in format '{row_format}', "
                        f"but the rows before are '{fmt}'"
                    )
            cut += _cut_long_text(row)
            rows.append(row)
        except DataError as err:
            if not skip_bad_rows:
                raise
            errors.append(err)
    if errors:
        warnings.warn(f"skipped {len(errors)} bad row(s) of {source}; first: {errors[0]}", stacklevel=3)
    if cut:
        warnings.warn(f"cut {cut} text value(s) of {source} to {MAX_TEXT_CHARS} characters", stacklevel=3)
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return Rows(rows=rows, format=fmt, skipped=len(errors), source=source, cut=cut)


def _note_skipped(rows: Rows, split: str) -> Rows:
    """Remember how many rows this load skipped, per (source, format, split): loading the same data twice (a check
    before the model loads, then the trainer's own load) counts its bad rows once."""
    if not hasattr(_skipped, "counts"):
        _skipped.counts = {}
    _skipped.counts[(rows.source, rows.format, split)] = rows.skipped
    return rows


def take_skipped_rows() -> int:
    """The number of bad rows skipped (skip_bad_rows) by the loads in this thread since the last call, and reset it.
    A run calls it so that its record holds the count, not only a warning on stderr."""
    counts = getattr(_skipped, "counts", {})
    _skipped.counts = {}
    return sum(counts.values())


def _cut_long_text(row: dict) -> int:
    """Cut the text values of a normalized row to MAX_TEXT_CHARS, in place; returns how many were cut. Prompt-side
    text keeps its end and completion-side text its start, as `batching.encode_completions` truncates tokens."""
    cut = 0

    def keep(text: str, tail: bool) -> str:
        nonlocal cut
        if len(text) <= MAX_TEXT_CHARS:
            return text
        cut += 1
        return text[-MAX_TEXT_CHARS:] if tail else text[:MAX_TEXT_CHARS]

    for key in ("prompt", "messages", "completion", "chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, str):
            row[key] = keep(value, tail=key == "prompt")
        elif isinstance(value, list):
            row[key] = [{**m, "content": keep(m["content"], tail=m["role"] != "assistant")} for m in value]
    return cut


def _read_file(path_text: str) -> list[Record]:
    """Records of a .jsonl file, or of a .json file holding either a JSON array or JSON Lines."""
    path = Path(path_text)
    if not path.is_file():
        raise DataError(f"data file not found: {path_text}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from Windows editors
    except UnicodeDecodeError as err:
        raise DataError(f"{path_text} is not UTF-8 text ({err.reason} at byte {err.start})") from None

    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # many ".json" files are really JSON Lines
        if isinstance(whole, list):
            return [(i, path_text, value) for i, value in enumerate(whole, 1)]

    records: list[Record] = []
    row = 0
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines (a trailing newline, a spacer) are not rows
        row += 1
        where = f"line {line_number} of {path_text}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            value = DataError(f"{_location(row, where)}invalid JSON ({err.msg} at column {err.colno})")
        records.append((row, where, value))
    return records


def split_hf_source(rest: str, split: str) -> tuple[str, str | None, str]:
    """Parse the part after "hf:", ID[:CONFIG][:SPLIT], into (ID, CONFIG or None, SPLIT or `split`).

    One part after ID is a SPLIT if it starts with a split name (see `_SPLIT_NAMES`), else a CONFIG:
    "openai/gsm8k:main" -> ("openai/gsm8k", "main", split); "org/prefs:test" -> ("org/prefs", None, "test");
    "openai/gsm8k:main:test[:10%]" -> ("openai/gsm8k", "main", "test[:10%]"). Colons inside a split's
    [slice] do not separate parts.
    """
    parts = re.split(r":(?![^\[]*\])", rest)  # a colon that is not inside [...]
    dataset_id, options = parts[0], parts[1:]
    if not dataset_id or len(options) > 2 or any(not part for part in options[1:]):
        raise DataError(f"data source 'hf:{rest}' is not hf:ID, hf:ID:SPLIT, hf:ID:CONFIG or hf:ID:CONFIG:SPLIT")
    if len(options) == 2:
        return dataset_id, options[0] or None, options[1]
    if len(options) == 1 and options[0]:
        if re.match(rf"^({'|'.join(_SPLIT_NAMES)})([_\-\[+].*)?$", options[0]):
            return dataset_id, None, options[0]
        return dataset_id, options[0], split
    return dataset_id, None, split


def _read_hf(rest: str, split: str, source: str) -> Iterable[Record]:
    """Records of an "hf:" source: a local file or folder when the path exists, else a hub dataset."""
    if rest and os.path.exists(rest):
        return _read_local(rest, None, split)
    dataset_id, config, split = split_hf_source(rest, split)
    if os.path.exists(dataset_id):
        return _read_local(dataset_id, config, split)
    if dataset_id.lower().endswith(FILE_SUFFIXES):
        raise DataError(f"data file not found: {dataset_id}")  # not "the hub could not be reached"
    return _read_hub(dataset_id, config, split, source)


def _read_local(path: str, config: str | None, split: str) -> Iterable[Record]:
    """Records of a local file (by suffix) or folder (`save_to_disk`, or anything `load_dataset` reads)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
            return _read_saved(path, split)
        return _read_hub(path, config, split, path)  # a folder of data files: datasets' packaged loaders, offline
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_file(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    readers = {".parquet": _parquet_table, ".csv": _csv_table, ".arrow": _arrow_table}
    if suffix not in readers:
        raise DataError(
            f"cannot read '{path}': use a .jsonl, .json, .parquet, .csv or .arrow file, or a dataset folder"
        )
    try:
        table = readers[suffix](path)
    except ImportError as err:
        raise DataError(f"reading {path} needs pyarrow (pip install pyarrow): {_first_line(err)}") from err
    except Exception as err:  # pyarrow's errors (ArrowInvalid, ...) are not OSErrors only
        raise DataError(f"{path} could not be read as {suffix[1:]}: {_first_line(err)}") from err
    return ((index, path, row) for index, row in enumerate(table.to_pylist(), 1))


def _parquet_table(path: str):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _csv_table(path: str):
    """A csv file, column types inferred as `datasets`' csv loader does ("42" -> 42), except that the text
    columns of a format stay text: an SFT pair "2+3=", "5" keeps its completion "5"."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    text_columns = {key: pa.string() for key in _FORMAT_KEYS + PROMPT_ALIASES}
    return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=text_columns))


def _arrow_table(path: str):
    """An Arrow IPC file: the stream format `datasets` writes, or the random-access file format."""
    import pyarrow as pa

    try:
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(path) as source:
            return pa.ipc.open_file(source).read_all()


def _read_saved(path: str, split: str) -> Iterator[Record]:
    """Records of a `save_to_disk` folder: a Dataset, or the `split` of a DatasetDict."""
    import datasets  # lazy: importing `datasets` is slow and only these sources need it

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as err:
        raise DataError(f"dataset folder {path} could not be loaded: {_first_line(err)}") from err
    where = path
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"dataset folder {path} has splits {', '.join(dataset)}, not '{split}'")
        dataset, where = dataset[split], f"{path} split {split}"
    return ((index, where, dict(row)) for index, row in enumerate(dataset, 1))


def _read_hub(dataset_id: str, config: str | None, split: str, source: str) -> Iterator[Record]:
    """Records of a Hugging Face dataset split. Offline, this fails with a one-line DataError."""
    import datasets  # lazy: importing `datasets` is slow and only this source needs it

    from lab.modeling import hub_reachable

    local = os.path.isdir(dataset_id)
    # With HF_HUB_OFFLINE set, `datasets` reads its cache and fails fast by itself; otherwise one quick connect
    # spares an offline user the library's retries (tens of seconds).
    offline_mode = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")

    def unreachable(why: str) -> DataError:
        return DataError(
            f"dataset '{dataset_id}' could not be reached ({why}); without a network, use a built-in task "
            f"({', '.join(task_names())}) or a local file (jsonl:PATH, .parquet, .csv, a saved dataset folder)"
        )

    if not offline_mode and not local and not hub_reachable():
        raise unreachable("the hub is offline from here")
    kwargs = {"name": config} if config else {}  # only when given: the call stays load_dataset(ID, split=...)
    try:
        dataset = datasets.load_dataset(dataset_id, split=split, **kwargs)
    except OSError as err:
        # ConnectionError, offline mode and "not found" are all OSErrors in datasets/huggingface_hub.
        if local:
            raise DataError(f"dataset folder {dataset_id} could not be loaded: {_first_line(err)}") from err
        raise unreachable(type(err).__name__) from err
    except Exception as err:  # a bad split or config name: say so in one line
        hint = "; name a config as hf:ID:CONFIG or hf:ID:CONFIG:SPLIT" if "config" in str(err).lower() else ""
        raise DataError(f"dataset '{dataset_id}' could not be loaded: {_first_line(err).rstrip('.')}{hint}") from err
    where = f"{source} split {split}"
    return ((index, where, dict(row)) for index, row in enumerate(dataset, 1))


def _load_task(name: str, fmt: str | None, split: str, skip_bad_rows: bool) -> Rows:
    """Rows of a built-in task; they go through the same validation as any file."""
    from lab.tasks import get_task

    task = get_task(name)
    fmt = fmt or "prompt_only"  # what online RL methods train on

    if fmt == "prompt_only":
        prompts = {"train": task.train_prompts, "eval": task.eval_prompts}.get(split)
        if prompts is None:
            raise DataError(f"task '{name}' has prompt splits 'train' and 'eval', not '{split}'")
        raw = [{"prompt": prompt} for prompt in prompts()]
    elif fmt == "prompt_completion":
        raw = task.sft_rows(split=split)
    elif fmt == "preference":
        try:
            raw = task.preference_rows(split=split)
        except (AttributeError, NotImplementedError):
            raise DataError(
                f"task '{name}' has no preference rows ({getattr(task, 'kind', '?')} task); "
                "use a graded or bandit task, or a jsonl:PATH of preference pairs"
            ) from None
    else:
        raise DataError(f"built-in tasks give prompt_only, prompt_completion or preference rows, not {fmt}")
    records = [(index, f"task {name}, split {split}", row) for index, row in enumerate(raw, 1)]
    return _collect(records, fmt, name, skip_bad_rows)


# ---------------------------------------------------------------------------------------------
# Row checks (each raises DataError with the row's location and the key)
# ---------------------------------------------------------------------------------------------


def _location(index: int | None, where: str) -> str:
    """The message prefix: 'row 17 (line 17 of prefs.jsonl): '."""
    if index is None:
        return f"{where}: " if where else ""
    return f"row {index} ({where}): " if where else f"row {index}: "


def _kind(value: Any) -> str:
    """How a bad value is described: 'int', 'an empty string', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, str) and not value.strip():
        return "an empty string"
    return type(value).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _required(row: dict, key: str, loc: str) -> Any:
    if key not in row:
        raise DataError(f"{loc}key '{key}' is missing")
    return row[key]


def _text(value: Any, key: str, loc: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{loc}key '{key}' must be a non-empty string, got {_kind(value)}")
    return value


def _check_messages(value: Any, key: str, loc: str) -> list[dict]:
    """A non-empty list of {"role": non-empty str, "content": str} objects."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _kind(value)
        raise DataError(f"{loc}key '{key}' must be a non-empty list of messages, got {got}")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(
                f"{loc}key '{key}[{i}]' must be a message object with 'role' and 'content', got {_kind(message)}"
            )
        for part in ("role", "content"):
            if part not in message:
                raise DataError(f"{loc}key '{key}[{i}].{part}' is missing")
        if not isinstance(message["role"], str) or not message["role"].strip():
            raise DataError(f"{loc}key '{key}[{i}].role' must be a non-empty string, got {_kind(message['role'])}")
        if message["role"] not in ROLES:
            raise DataError(
                f"{loc}key '{key}[{i}].role' must be one of {', '.join(ROLES)}, got {message['role'][:40]!r}"
            )
        if not isinstance(message["content"], str):
            raise DataError(f"{loc}key '{key}[{i}].content' must be a string, got {_kind(message['content'])}")
    return value


def _messages(row: dict, key: str, loc: str) -> list[dict]:
    return _check_messages(_required(row, key, loc), key, loc)


def _prompt(row: dict, loc: str, key: str = "prompt") -> str | list[dict]:
    """A prompt is a non-empty string or a non-empty message list (`key`: where the row keeps it)."""
    value = _required(row, key, loc)
    if isinstance(value, list):
        return _check_messages(value, key, loc)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{loc}key '{key}' must be a non-empty string or a list of messages, got {_kind(value)}")
    return value


def _completion(row: dict, key: str, loc: str) -> str:
    """A completion after an explicit prompt: a non-empty string, or one assistant message (-> its content)."""
    value = _required(row, key, loc)
    if not isinstance(value, list):
        return _text(value, key, loc)
    messages = _check_messages(value, key, loc)
    if len(messages) != 1:
        raise DataError(
            f"{loc}key '{key}' must hold a single assistant message after 'prompt', got {len(messages)} messages"
        )
    return _split_last_assistant(messages, key, loc)[1]


def _split_last_assistant(messages: list[dict], key: str, loc: str) -> tuple[list[dict], str]:
    """(messages before the last one, content of the last one), which must be a non-empty assistant message."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(f"{loc}key '{key}' must end with an assistant message, but ends with role '{last['role']}'")
    if not last["content"].strip():
        where = f"{key}[{len(messages) - 1}].content"
        raise DataError(f"{loc}key '{where}' must be a non-empty string, got an empty string")
    return messages[:-1], last["content"]


def unique_prompts(rows) -> list:
    """The distinct prompts of ``rows`` in first-seen order. Naive equivalent: ``list(dict.fromkeys(prompts))``,
    which fails on conversational prompts (lists of messages are unhashable), hence the JSON key."""
    seen: dict[str, object] = {}
    for row in rows:
        seen.setdefault(json.dumps(row["prompt"], sort_keys=True), row["prompt"])
    return list(seen.values())


def prompt_columns(rows: Iterable[dict]) -> dict[str, list]:
    """The extra columns of prompt rows as lists aligned with the rows: what a reward function receives as
    keyword arguments (TRL's convention: every dataset column but "prompt" / "completion").

    Naive equivalent: ``{key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}``; here a
    key that only some rows have is still a column, with None where a row lacks it (JSONL rows may differ).
    For GRPO, pass the rows repeated G times, as the prompts are, so the columns stay aligned.
    """
    rows = list(rows)
    keys = dict.fromkeys(key for row in rows for key in row if key not in _FORMAT_KEYS + ("completion_ids",))
    return {key: [row.get(key) for row in rows] for key in keys}
