"""The input-validation vocabulary shared by ``data_tools.preprocess`` and ``data_tools.sft``.

Two kinds of failure, and nothing else:

* a **bad record** (one line / row / conversation) is *skipped and counted* under one of the fixed
  :data:`SKIP_REASONS` codes; the summary lists up to ``EXAMPLES_PER_REASON`` ``file:line`` examples
  per code and ``PREFIX.skipped.tsv`` lists every skipped record (``file:line<TAB>code<TAB>detail``).
  ``--strict`` turns the first one into an error instead.
* a **bad file** (unreadable, not gzip, truncated, no usable record, ...) is an
  :class:`InputFileError` whose message names the file and says how to fix it; the run stops and
  writes nothing (the previous output stays as it was).

A run whose output would be empty is an error too (see :func:`empty_output_error`).
"""

from __future__ import annotations

import json
from typing import Optional

from longcat_megatron.errors import UserInputError

EXAMPLES_PER_REASON = 5

# code -> what it means (the summary prints both). Keep codes stable: scripts read them.
SKIP_REASONS = {
    "invalid_utf8": "bytes that are not valid UTF-8",
    "lone_surrogate": "a lone UTF-16 surrogate escape (e.g. \\ud800) that no tokenizer can encode",
    "blank_line": "an empty line in a JSONL file",
    "malformed_json": "a line that is not valid JSON",
    "not_an_object": "a JSON value that is not an object",
    "missing_key": "an object without the --json-key field",
    "not_a_string": "a --json-key value that is not a string",
    "null_value": "a null value in the Parquet column",
    "empty_document": "a document that is empty or whitespace only",
    "no_tokens": "a document the tokenizer turns into no tokens",
    "no_messages": "a record without a 'messages' list",
    "bad_message": "a message that is not an object with a known role",
    "bad_content": "a message content that is not a string",
    "empty_turn": "a user/system/tool message with no content, or an assistant turn with neither content "
                  "nor tool_calls",
    "bad_tool_calls": "assistant tool_calls that are not a list of {name, arguments} objects",
    "bad_tools": "a 'tools' field that is not a list of objects",
    "no_assistant_turn": "a conversation without an assistant turn (nothing to learn)",
    "template_error": "the chat template refused the conversation (raise_exception or a rendering error)",
    "template_not_prefix_stable": "the chat template renders earlier turns differently as the conversation "
                                  "grows, so assistant tokens cannot be located",
    "too_long": "a conversation longer than seq-length + 1 tokens (use --truncate to keep its start)",
}


class RecordSkip(Exception):
    """Raised inside record validation: skip this record under ``code`` (one of SKIP_REASONS)."""

    def __init__(self, code: str, detail: str = ""):
        assert code in SKIP_REASONS, code
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code, self.detail = code, detail


class InputFileError(UserInputError):
    """A whole input file (or the tokenizer) is unusable; the message names it and the fix."""


class StrictStop(UserInputError):
    """``--strict`` stopped the run at the first bad record; the message names ``file:line``."""


def location(path: str, loc) -> str:
    """``file:line`` (or ``file:row N``, or just ``file`` for a whole-file problem)."""
    return path if loc in (None, "file") else f"{path}:{loc}"


_JSON_TYPE_NAMES = {"int": "number", "float": "number", "list": "array", "str": "string", "bool": "boolean",
                    "NoneType": "null", "dict": "object"}


def json_type(value) -> str:
    """The JSON name of a parsed value's type (number, array, string, ...)."""
    return _JSON_TYPE_NAMES.get(type(value).__name__, type(value).__name__)


def json_error_detail(exc: json.JSONDecodeError) -> str:
    """``Expecting value (column 5)``: json's message without its dangling 'at'."""
    msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
    return f"{msg} (column {exc.colno})"


def has_lone_surrogate(text: str) -> bool:
    """True when ``text`` holds a surrogate code point (only JSON ``\\udXXX`` escapes make these)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def may_hold_surrogate_escape(line: str) -> bool:
    """Cheap pre-check on a raw JSON line: could json.loads produce a lone surrogate from it?"""
    return "\\ud" in line or "\\uD" in line


class SkipLog:
    """Counts skipped records by code, keeps examples, streams every one to a reasons file."""

    def __init__(self, reasons_path: Optional[str], strict: bool = False,
                 examples_per_reason: int = EXAMPLES_PER_REASON):
        self.strict = strict
        self.examples_per_reason = examples_per_reason
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.reasons_path = reasons_path
        self._file = open(reasons_path, "w", encoding="utf-8") if reasons_path else None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, where: str, code: str, detail: str = "") -> None:
        """Count one skipped record (``--strict``: raise :class:`StrictStop` naming it)."""
        if code not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {code!r}")
        text = f"{where}: {code}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise StrictStop(f"{text} - {SKIP_REASONS[code]} (stopped by --strict; fix or remove that record)")
        self.counts[code] = self.counts.get(code, 0) + 1
        examples = self.examples.setdefault(code, [])
        if len(examples) < self.examples_per_reason:
            examples.append(text)
        if self._file is not None:
            self._file.write(f"{where}\t{code}\t{detail}\n".replace("\r", " "))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def to_json(self) -> dict:
        """``{code: {"count", "meaning", "examples"}}`` in descending count order."""
        return {code: {"count": n, "meaning": SKIP_REASONS[code], "examples": self.examples[code]}
                for code, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))}

    def brief(self, limit: int = 3) -> str:
        """``3 x missing_key (e.g. f.jsonl:1: missing_key (...)), ...`` for error messages."""
        parts = [f"{e['count']} x {code} (e.g. {e['examples'][0]})"
                 for code, e in list(self.to_json().items())[:limit]]
        return "; ".join(parts) if parts else "no records"


def empty_output_error(what: str, skips: SkipLog, hint: str, unit: str = "documents") -> InputFileError:
    """The error for a run (or input file) that produced nothing: what was skipped and the fix."""
    return InputFileError(
        f"{what} produced no {unit} ({skips.total} records skipped: {skips.brief()}). {hint} "
        "Nothing was written."
    )
