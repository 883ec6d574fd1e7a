"""Datasets in the formats TRL users know: JSONL files, Hugging Face datasets, built-in tasks.

Formats, told apart by their keys:

    prompt_only        {"prompt"}                          prompts for online RL (PPO, GRPO, ...)
    prompt_completion  {"prompt", "completion"}            SFT pairs
    preference         {"prompt", "chosen", "rejected"}    reward model / DPO pairs (explicit prompt)
                       {"chosen", "rejected"}              same, implicit prompt (see `split_implicit_prompt`)
    conversational     {"messages": [{"role", "content"}, ...]}

Like TRL's "conversational" type, the values of prompt / completion / chosen / rejected may also be
message lists instead of strings. Other keys (an "answer" column, an "id") are kept as they are.

What a method receives after `normalize_row`:
- `prompt` is a non-empty string or a non-empty list of messages (`sampling.format_prompt` renders a
  message list with the tokenizer's chat template);
- `completion`, `chosen` and `rejected` are always non-empty strings: the text the model should write
  after the prompt. A conversational completion is reduced to its assistant message's content, so
  every trainer tokenizes completions the same way.

Bad rows raise `DataError` naming the row and the key:

    row 17 (line 17 of prefs.jsonl): key 'chosen' is missing
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

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

# Shown in error messages when lab.tasks cannot be imported.
_FALLBACK_TASKS = ("arith", "reviews", "bandit")


class DataError(ValueError):
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
    raise DataError(
        f"cannot tell the format from keys {sorted(keys)}: expected 'prompt', 'prompt'+'completion', "
        "'chosen'+'rejected' (with or without 'prompt') or 'messages'"
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
    - {"messages"} asked for as prompt_only -> prompt = the messages without a final assistant turn.
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


def load_rows(source: str, *, format: str | None = None, split: str = "train", skip_bad_rows: bool = False) -> Rows:
    """Load and normalize the rows of a data source.

    `source` is one of:
    - "jsonl:PATH", or a path ending in .jsonl / .json (a .json file may hold a JSON array of
      objects or JSON Lines);
    - "hf:ID" or "hf:ID:SPLIT" (`datasets.load_dataset`; SPLIT overrides `split`);
    - a built-in task name: rows come from the task. `format` picks which rows:
      prompt_only (the default) -> train_prompts() / eval_prompts() for split "train" / "eval",
      prompt_completion -> sft_rows(split), preference -> preference_rows(split).

    `format` None means: the format the first usable row's keys say, and every row must agree.
    A bad row raises DataError; with skip_bad_rows=True bad rows are dropped, counted in
    `Rows.skipped`, and one warning gives the count.
    """
    fmt = canonical_format(format) if format is not None else None
    source = str(source)

    if source.startswith("hf:"):
        dataset_id, _, source_split = source[3:].partition(":")
        if not dataset_id:
            raise DataError(f"data source '{source}' names no dataset: use hf:ID or hf:ID:SPLIT")
        records = _read_hub(dataset_id, source_split or split, source)
    elif source.startswith("jsonl:") or source.endswith((".jsonl", ".json")):
        path = source[len("jsonl:") :] if source.startswith("jsonl:") else source
        records = _read_file(path)
    elif source in task_names():
        return _load_task(source, fmt, split, skip_bad_rows)
    else:
        raise DataError(
            f"unknown data source '{source}': use jsonl:PATH, a .jsonl/.json file, hf:ID[:SPLIT], "
            f"or a built-in task ({', '.join(task_names())})"
        )
    return _collect(records, fmt, source, skip_bad_rows)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSON Lines (UTF-8, one object per line), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def task_names() -> list[str]:
    """Names of the built-in tasks; imported lazily so loading a file never imports the tasks."""
    try:
        from lab.tasks import TASKS
    except ImportError:
        return list(_FALLBACK_TASKS)
    return list(TASKS)


# A record is (row number, where it came from, parsed value or the DataError that parsing raised).
Record = tuple[int, str, Any]


def _collect(records: Iterable[Record], fmt: str | None, source: str, skip_bad_rows: bool) -> Rows:
    """Normalize every record; raise on the first bad one, or skip and count them."""
    detect = fmt is None
    rows: list[dict] = []
    errors: list[DataError] = []
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
            rows.append(row)
        except DataError as err:
            if not skip_bad_rows:
                raise
            errors.append(err)
    if errors:
        warnings.warn(f"skipped {len(errors)} bad row(s) of {source}; first: {errors[0]}", stacklevel=3)
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return Rows(rows=rows, format=fmt, skipped=len(errors), source=source)


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


def _read_hub(dataset_id: str, split: str, source: str) -> Iterator[Record]:
    """Records of a Hugging Face dataset split. Offline, this fails with a one-line DataError."""
    import datasets  # lazy: importing `datasets` is slow and only this source needs it

    from lab.modeling import hub_reachable

    # With HF_HUB_OFFLINE set, `datasets` reads its cache and fails fast by itself; otherwise one quick connect
    # spares an offline user the library's retries (tens of seconds).
    offline_mode = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline_mode and not os.path.isdir(dataset_id) and not hub_reachable():
        raise DataError(
            f"dataset '{dataset_id}' could not be reached (the hub is offline from here); without a network, use "
            f"a built-in task ({', '.join(task_names())}) or a local jsonl:PATH")
    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except OSError as err:
        # ConnectionError, offline mode and "not found" are all OSErrors in datasets/huggingface_hub.
        raise DataError(
            f"dataset '{dataset_id}' could not be reached ({type(err).__name__}); without a network, use "
            f"a built-in task ({', '.join(task_names())}) or a local jsonl:PATH"
        ) from err
    except Exception as err:  # a bad split or config name: say so in one line
        raise DataError(f"dataset '{dataset_id}' could not be loaded: {_first_line(err)}") from err
    where = f"{source} split {split}"
    return ((index, where, dict(row)) for index, row in enumerate(dataset, 1))


def _load_task(name: str, fmt: str | None, split: str, skip_bad_rows: bool) -> Rows:
    """Rows of a built-in task; they go through the same validation as any file."""
    try:
        from lab.tasks import get_task
    except ImportError as err:
        raise DataError(f"built-in task '{name}' is not available: {_first_line(err)}") from err
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
        if not isinstance(message["content"], str):
            raise DataError(f"{loc}key '{key}[{i}].content' must be a string, got {_kind(message['content'])}")
    return value


def _messages(row: dict, key: str, loc: str) -> list[dict]:
    return _check_messages(_required(row, key, loc), key, loc)


def _prompt(row: dict, loc: str) -> str | list[dict]:
    """A prompt is a non-empty string or a non-empty message list."""
    value = _required(row, "prompt", loc)
    if isinstance(value, list):
        return _check_messages(value, "prompt", loc)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{loc}key 'prompt' must be a non-empty string or a list of messages, got {_kind(value)}")
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
