"""Records from a user's file: .jsonl/.json (objects), .csv/.tsv (a header row), or .txt/.md (one text).

A record is a dict of field -> string. `read_records` parses a whole file and refuses what doesn't parse
with the line number (bad JSON on line N, a ragged CSV row on line N); `pick` then takes the fields a
dataset needs (a text field, or a prompt and a response field) and names the line of a missing field
or an empty response. `preview` shows the first records and the fields found, for the studio's pickers.
Nothing here writes anything: a refused file leaves no dataset behind.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from core.checks import check_text, is_number
from core.train.data import MAX_TEXT_BYTES, TEXT_SUFFIXES, decode_text

RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
SUFFIXES = RECORD_SUFFIXES + TEXT_SUFFIXES
MAX_RECORDS = 1_000_000  # more records than this are refused (memory; a classroom set is a few thousand)
MAX_FIELDS = 200  # columns / keys per record
PREVIEW_CHARS = 200  # a preview cell shows at most this many characters


@dataclass(slots=True)  # a million of them may be held: no per-record __dict__
class Record:
    line: int  # where the record starts in its file (1-based; for .json, the array element's number)
    fields: dict  # field name -> its value as a string


@dataclass
class Fields:
    """Which fields of the records a dataset reads: `text`, or `prompt` and `response`."""
    text: str | None = None  # a plain-text dataset: this field of each record is one document
    prompt: str | None = None  # an instruction dataset: the prompt's field (no loss on its tokens)
    response: str | None = None  # ... and the response's field (the loss is computed on these tokens)

    def check(self) -> None:
        if self.text and (self.prompt or self.response):
            raise ValueError("choose either a text field, or a prompt field and a response field, not both.")
        if not self.text and not (self.prompt and self.response):
            raise ValueError("choose a text field, or both a prompt field and a response field.")

    @property
    def instruction(self) -> bool:
        return bool(self.prompt and self.response)


def kind_of(name: str) -> str:
    """'jsonl', 'json', 'csv', 'tsv' or 'text', from the file name; ValueError for other kinds."""
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{Path(name).name}: use a .jsonl, .json, .csv, .tsv, .txt or .md file.")
    return "text" if suffix in TEXT_SUFFIXES else suffix[1:]


def _value(v, name: str, where: str, key: str) -> str:
    if isinstance(v, str):
        return check_text(v, f"{name}: {where}: field '{key}'")
    if is_number(v):
        return str(v)
    if v is None:
        return ""
    raise ValueError(f"{name}: {where}: field '{key}' is a {type(v).__name__}, not text; give it as a string.")


def _object(obj, name: str, where: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: {where} is a JSON {type(obj).__name__}, not an object with fields "
                         f'(e.g. {{"prompt": "...", "response": "..."}}).')
    if len(obj) > MAX_FIELDS:
        raise ValueError(f"{name}: {where} has {len(obj)} fields; at most {MAX_FIELDS} are read.")
    # a JSON escape (\\ud800) can put a lone surrogate in a field's name or value: no page can show it
    keys = [check_text(str(k), f"{name}: {where}: a field name") for k in obj]
    return Record(line, {k: _value(v, name, where, k) for k, v in zip(keys, obj.values())})


def _parse_error(e: Exception, name: str, where: str) -> ValueError:
    """One sentence for what json raised while reading `where` of file `name`."""
    if isinstance(e, json.JSONDecodeError):
        return ValueError(f"{name}: bad JSON on {where}: {e.msg} at column {e.colno}; fix it.")
    if isinstance(e, RecursionError):
        return ValueError(f"{name}: {where} is nested too deeply to be read.")
    # Python refuses to convert an integer of more than 4,300 digits (sys.get_int_max_str_digits)
    return ValueError(f"{name}: {where} holds a number too long to read (over 4,300 digits); give it as a "
                      f"string, in quotes.")


def _lines(text: str, keepends: bool = False):
    """(line number, line) of `text`, one at a time: a list of every line would cost far more than the text."""
    start, n = 0, 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        n += 1
        yield n, text[start:end] if keepends else text[start:end].rstrip("\n")
        start = end


def _over_cap(name: str, what: str = "records") -> ValueError:
    return ValueError(f"{name} has more than {MAX_RECORDS:,} {what}; use a smaller part of it.")


def _jsonl(text: str, name: str) -> list[Record]:
    out = []
    for n, line in _lines(text):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not records
        if len(out) == MAX_RECORDS:
            raise _over_cap(name)
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise _parse_error(e, name, f"line {n}") from None
        out.append(_object(obj, name, f"line {n}", n))
    return out


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\r\n]*")  # JSON's whitespace


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json(text: str, name: str) -> list[Record]:
    """An array of objects (or one object), decoded one element at a time and refused at the record cap:
    json.loads of a 32 MB array of {} builds 11 million dicts (over 1 GB) before its length could be checked.
    The text itself is already in memory (it is bounded by the upload limit), so no chunked reading is needed.
    Records are named by their number in the array."""
    pos = _SPACE.match(text).end()
    if not text.startswith("[", pos):  # one object
        try:
            data, pos = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            raise _parse_error(e, name, f"line {_line_at(text, getattr(e, 'pos', pos))}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{name}: a .json file must hold an array of objects (or one object).")
        out = [_object(data, name, "record 1", 1)]
    else:
        out, pos = [], _SPACE.match(text, pos + 1).end()
        closed = text.startswith("]", pos)
        while not closed:
            if len(out) == MAX_RECORDS:
                raise _over_cap(name)
            where = f"record {len(out) + 1}"
            try:
                obj, pos = _DECODER.raw_decode(text, pos)
            except (ValueError, RecursionError) as e:
                raise _parse_error(e, name, f"line {_line_at(text, pos)} ({where})") from None
            out.append(_object(obj, name, where, len(out) + 1))
            pos = _SPACE.match(text, pos).end()
            closed = text.startswith("]", pos)
            if not closed and not text.startswith(",", pos):
                raise ValueError(f"{name}: bad JSON on line {_line_at(text, pos)} (expected ',' or ']' after "
                                 f"{where}); fix it.")
            pos = _SPACE.match(text, pos + 1).end() if not closed else pos
        pos += 1
    if (pos := _SPACE.match(text, pos).end()) < len(text):
        raise ValueError(f"{name}: bad JSON on line {_line_at(text, pos)} (extra data after the value); a .json "
                         f"file holds one array of objects (or one object).")
    return out


def _csv(text: str, name: str, delimiter: str) -> list[Record]:
    reader = csv.reader((line for _, line in _lines(text, keepends=True)), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise ValueError(f"{name} is empty; the first row must name the columns.")
        header = [h.strip() for h in header]
        if len(header) > MAX_FIELDS or len(set(header)) != len(header) or "" in header:
            raise ValueError(f"{name}: the header row must name each column once, with at most {MAX_FIELDS} "
                             f"columns (got {header[:10]}).")
        out = []
        for row in reader:
            if not row or all(not c.strip() for c in row) and len(row) <= 1:
                continue  # blank lines
            if len(out) == MAX_RECORDS:
                raise _over_cap(name, "rows")
            if len(row) != len(header):
                raise ValueError(f"{name}: row on line {reader.line_num} has {len(row)} columns, the header has "
                                 f"{len(header)} (a ragged file: check the quotes and the "
                                 f"{'tabs' if delimiter == chr(9) else 'commas'} on that line).")
            out.append(Record(reader.line_num, dict(zip(header, row))))
    except csv.Error as e:
        raise ValueError(f"{name}: unreadable CSV on line {reader.line_num} ({e}).") from None
    return out


def read_records(data: bytes, name: str) -> list[Record]:
    """The records of a file's bytes (`name` gives its kind and names it in errors). A .txt/.md file is
    one record with the field 'text'. ValueError with the line number for what doesn't parse."""
    kind = kind_of(name)
    text = decode_text(data, name)  # size cap, binary, UTF-8 (as plain text files)
    if kind == "text":
        return [Record(1, {"text": text})]
    records = {"jsonl": _jsonl, "json": _json}.get(kind)
    records = records(text, name) if records else _csv(text, name, "\t" if kind == "tsv" else ",")
    if not records:
        raise ValueError(f"{name} holds no records; give at least two.")
    return records


def read_file(path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.name}: no such file.")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise ValueError(f"{path.name} is larger than {MAX_TEXT_BYTES // 2**20} MiB; use a smaller part of it.")
    return read_records(path.read_bytes(), path.name)


def field_names(records: list[Record]) -> list[str]:
    """Every field seen, in the order first seen."""
    seen: dict[str, None] = {}
    for r in records:
        seen.update(dict.fromkeys(r.fields))
    return list(seen)


def pick(records: list[Record], fields: Fields, name: str) -> list[dict]:
    """The chosen fields of every record: [{'text': ...}] or [{'prompt': ..., 'response': ...}].
    ValueError naming the line of a missing field or an empty response (or text)."""
    fields.check()
    wanted = {"text": fields.text} if fields.text else {"prompt": fields.prompt, "response": fields.response}
    out = []
    for r in records:
        for role, key in wanted.items():
            if key not in r.fields:
                known = ", ".join(list(r.fields)[:10])
                raise ValueError(f"{name}: line {r.line} has no field '{key}' (it has: {known}); choose "
                                 f"another {role} field or fix that record.")
        row = {role: r.fields[key] for role, key in wanted.items()}
        empty = "text" if fields.text else "response"
        if not row[empty].strip():
            raise ValueError(f"{name}: empty {empty} on line {r.line}; every record needs some {empty} "
                             f"to train on. Fill it in or remove that record.")
        out.append(row)
    return out


def preview(data: bytes, name: str, rows: int = 5) -> tuple[list[str], list[list[str]]]:
    """The fields found and the first `rows` records (cells cut to PREVIEW_CHARS), for a table."""
    return preview_records(read_records(data, name), rows)


def preview_records(records: list[Record], rows: int = 5) -> tuple[list[str], list[list[str]]]:
    """`preview` of records already read."""
    names = field_names(records)
    cut = [[(v := r.fields.get(k, ""))[:PREVIEW_CHARS] + ("…" if len(v) > PREVIEW_CHARS else "") for k in names]
           for r in records[:rows]]
    return names, cut
