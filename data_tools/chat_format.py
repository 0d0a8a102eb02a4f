"""Chat conversations -> token ids + loss mask (1 on assistant tokens only).

Input: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
"tool_calls": [...] (assistant, optional), "name": str (tool, optional)}, ...], "tools": [...]}``.

Two formats:

* **hf** - the tokenizer's own chat template (``chat_template`` in ``tokenizer_config.json`` or
  ``chat_template.jinja``), rendered with Jinja2 the way ``transformers`` does. Assistant spans are
  found by rendering growing prefixes of the conversation: the text a turn adds after the
  generation prompt (``add_generation_prompt=True``) is the assistant's (including the template's
  end-of-turn marker). The full text is tokenized once and a token is in the loss when its first
  character lies in an assistant span. Templates that re-render earlier turns differently as the
  conversation grows (not prefix-stable) are rejected with a clear error.
* **longcat** - the documented LongCat-style fallback for tokenizers without a template; pieces are
  tokenized separately and concatenated::

      TOOLS:{json list of the record's tools}\\n  (only when the record has "tools", no loss)
      SYSTEM:{system}\\n                       (optional, no loss)
      [Round {r}] USER:{user}                  (no loss; r counts user turns from 0, then a space)
      TOOL:{tool result}                       (no loss, then a space)
      ASSISTANT:                               (no loss: the prompt of every assistant turn)
      {content}<longcat_tool_call>{json}</longcat_tool_call>...{EOS}   (loss)

Records are validated first (:func:`validate_messages`): a bad record raises
:class:`~data_tools.validation.RecordSkip` with one of the fixed skip codes (no_messages, bad_message,
bad_content, empty_turn, bad_tool_calls, bad_tools, no_assistant_turn), as does a template that
refuses a conversation (``raise_exception``: template_error) or is not prefix-stable. ``tool_calls``
must be a list of objects, each ``{"function": {"name": str, "arguments": ...}}`` or
``{"name": str, "arguments": ...}``; ``tools`` a list of objects.

When the generation prompt of an HF template ends inside a token (typically a trailing space: the
reply's first word is tokenized together with it), that straddling token is counted as the
assistant's (in the loss) and reported, so the first word of every reply is still learned.

Every conversation ends with EOS (appended without loss if the template did not end with it), so
packed conversations are separated the same way as pretraining documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from data_tools.validation import RecordSkip, json_type
from longcat_megatron.errors import UserInputError

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<longcat_tool_call>", "</longcat_tool_call>"


class ChatFormatError(UserInputError):
    """The chat template itself is unusable (cannot be compiled); the message says why."""


@dataclass
class TokenizedChat:
    ids: list[int]
    loss_mask: list[int]
    straddling: int = 0  # assistant turns whose first token starts inside the generation prompt


def _check_tool_calls(i: int, calls) -> None:
    if not isinstance(calls, list):
        raise RecordSkip("bad_tool_calls", f"messages[{i}].tool_calls is a JSON {json_type(calls)}, not a list")
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordSkip("bad_tool_calls", f"messages[{i}].tool_calls[{k}] has no string 'name' "
                                               "(or function.name)")


def validate_messages(record) -> list[dict]:
    """The ``messages`` of a record, checked; raises :class:`RecordSkip` naming what is wrong."""
    if not isinstance(record, dict):
        raise RecordSkip("not_an_object", f"the line is a JSON {json_type(record)}")
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise RecordSkip("no_messages", "no 'messages' key" if messages is None
                         else f"'messages' is a JSON {json_type(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordSkip("bad_message", f"messages[{i}] is a JSON {json_type(m)}")
        if m.get("role") not in ROLES:
            raise RecordSkip("bad_message", f"messages[{i}].role is {m.get('role')!r}, not one of {ROLES}")
        content = m.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RecordSkip("bad_content", f"messages[{i}].content is a JSON {json_type(content)}")
        if m.get("tool_calls") is not None:
            if m["role"] != "assistant":
                raise RecordSkip("bad_tool_calls", f"messages[{i}] ({m['role']}) has tool_calls")
            _check_tool_calls(i, m["tool_calls"])
        if m["role"] != "assistant" and not content.strip():
            raise RecordSkip("empty_turn", f"messages[{i}] ({m['role']}) is empty")
        if m["role"] == "assistant" and not content.strip() and not m.get("tool_calls"):
            raise RecordSkip("empty_turn", f"messages[{i}] (assistant) has neither content nor tool_calls")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordSkip("no_assistant_turn")
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RecordSkip("bad_tools", f"'tools' is a JSON {json_type(tools)}, not a list of objects")
    return messages


def _render_tool_calls(calls) -> str:
    out = []
    for call in calls or []:
        fn = call.get("function", call)
        out.append(TOOL_CALL_OPEN + json.dumps(fn, ensure_ascii=False, sort_keys=True) + TOOL_CALL_CLOSE)
    return "".join(out)


def longcat_pieces(messages: list[dict], tools: Optional[list] = None) -> list[tuple[str, bool]]:
    """(text, in_loss) pieces of the LongCat-style format, without the EOS of assistant turns."""
    pieces: list[tuple[str, bool]] = []
    if tools:
        pieces.append((f"TOOLS:{json.dumps(tools, ensure_ascii=False, sort_keys=True)}\n", False))
    round_no = 0
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "system":
            pieces.append((f"SYSTEM:{content}\n", False))
        elif m["role"] == "user":
            pieces.append((f"[Round {round_no}] USER:{content} ", False))
            round_no += 1
        elif m["role"] == "tool":
            pieces.append((f"TOOL:{content} ", False))
        else:
            pieces.append(("ASSISTANT:", False))
            pieces.append((content + _render_tool_calls(m.get("tool_calls")), True))
    return pieces


def tokenize_longcat(tokenizer, messages: list[dict], eos_id: int, tools: Optional[list] = None) -> TokenizedChat:
    """Token ids and loss mask in the LongCat-style format (EOS closes every assistant turn)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, in_loss in longcat_pieces(messages, tools):
        piece = tokenizer.encode(text, add_special_tokens=False).ids if text else []
        if in_loss:
            piece = piece + [eos_id]
        ids += piece
        mask += [int(in_loss)] * len(piece)
    return TokenizedChat(ids, mask)


class HFChatTemplate:
    """A Hugging Face Jinja chat template, rendered as ``transformers`` does (offline, no model)."""

    def __init__(self, template: str, special_tokens: dict):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(template)
        except TemplateError as exc:
            raise ChatFormatError(f"the tokenizer's chat_template does not compile ({exc}); fix it in "
                                  "tokenizer_config.json / chat_template.jinja, or use --template longcat") from None
        self._special = special_tokens

    def render(self, messages: list[dict], tools: Optional[list], add_generation_prompt: bool) -> str:
        """The template's text; a template that refuses the conversation raises RecordSkip."""
        try:
            return self._template.render(messages=messages, tools=tools,
                                         add_generation_prompt=add_generation_prompt, **self._special)
        except Exception as exc:  # noqa: BLE001 - raise_exception, undefined names, type errors in Jinja
            raise RecordSkip("template_error", f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def assistant_spans(self, messages: list[dict], tools: Optional[list]) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans of assistant turns."""
        full = self.render(messages, tools, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], tools, True)
            upto = self.render(messages[: i + 1], tools, False)
            if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
                raise RecordSkip("template_not_prefix_stable", f"at messages[{i}]; use --template longcat")
            spans.append((len(before), len(upto)))
        return full, spans


def tokenize_hf(tokenizer, template: HFChatTemplate, messages: list[dict], tools, eos_id: int) -> TokenizedChat:
    """Token ids and loss mask using the tokenizer's chat template."""
    text, spans = template.assistant_spans(messages, tools)
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    # A token is the assistant's when it overlaps an assistant span; one that starts before the span
    # (inside the generation prompt, e.g. " Hello" after "Assistant: ") straddles the boundary.
    mask = [int(end > start and any(start < b and end > a for a, b in spans)) for start, end in enc.offsets]
    straddling = sum(1 for a, _ in spans if any(start < a < end for start, end in enc.offsets))
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
        mask.append(0)
    return TokenizedChat(ids, mask, straddling)
