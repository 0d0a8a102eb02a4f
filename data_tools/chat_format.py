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

      SYSTEM:{system}\\n                       (optional, no loss)
      [Round {r}] USER:{user}                  (no loss; r counts user turns from 0, then a space)
      TOOL:{tool result}                       (no loss, then a space)
      ASSISTANT:                               (no loss: the prompt of every assistant turn)
      {content}<longcat_tool_call>{json}</longcat_tool_call>...{EOS}   (loss)

Every conversation ends with EOS (appended without loss if the template did not end with it), so
packed conversations are separated the same way as pretraining documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from longcat_megatron.errors import UserInputError

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<longcat_tool_call>", "</longcat_tool_call>"


class ChatFormatError(UserInputError):
    """A conversation or chat template is unusable; the message says why."""


@dataclass
class TokenizedChat:
    ids: list[int]
    loss_mask: list[int]


def validate_messages(record) -> list[dict]:
    """The ``messages`` of a record, checked (roles, string contents, at least one assistant turn)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ChatFormatError("record has no 'messages' list")
    messages = record["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatFormatError(f"messages[{i}]: role must be one of {ROLES}")
        content = m.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{i}].content must be a string")
        if m["role"] != "assistant" and not content.strip():
            raise ChatFormatError(f"messages[{i}] ({m['role']}) is empty")
        if m["role"] == "assistant" and not content.strip() and not m.get("tool_calls"):
            raise ChatFormatError(f"messages[{i}] (assistant) has neither content nor tool_calls")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("conversation has no assistant turn (nothing to learn)")
    return messages


def _render_tool_calls(calls) -> str:
    out = []
    for call in calls or []:
        fn = call.get("function", call) if isinstance(call, dict) else call
        out.append(TOOL_CALL_OPEN + json.dumps(fn, ensure_ascii=False, sort_keys=True) + TOOL_CALL_CLOSE)
    return "".join(out)


def longcat_pieces(messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, in_loss) pieces of the LongCat-style format, without the EOS of assistant turns."""
    pieces: list[tuple[str, bool]] = []
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


def tokenize_longcat(tokenizer, messages: list[dict], eos_id: int) -> TokenizedChat:
    """Token ids and loss mask in the LongCat-style format (EOS closes every assistant turn)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, in_loss in longcat_pieces(messages):
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
        self._template = env.from_string(template)
        self._special = special_tokens

    def render(self, messages: list[dict], tools: Optional[list], add_generation_prompt: bool) -> str:
        return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     **self._special)

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
                raise ChatFormatError(
                    "the tokenizer's chat template is not prefix-stable (rendering a shorter conversation "
                    "is not a prefix of the full one), so assistant tokens cannot be located; use "
                    "--template longcat"
                )
            spans.append((len(before), len(upto)))
        return full, spans


def tokenize_hf(tokenizer, template: HFChatTemplate, messages: list[dict], tools, eos_id: int) -> TokenizedChat:
    """Token ids and loss mask using the tokenizer's chat template."""
    text, spans = template.assistant_spans(messages, tools)
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    mask = []
    for start, end in enc.offsets:
        mask.append(int(any(a <= start < b for a, b in spans) and end > start))
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
        mask.append(0)
    return TokenizedChat(ids, mask)
