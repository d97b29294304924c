"""Chat with base OPT models through a plain-text dialogue template.

OPT is not instruction-tuned, so a chat is framed as a transcript the model continues, the layout its
model card and the OPT paper use for dialogue prompts (e.g. "Human: ... / Statue: ..."):

    {system}

    Human: {user message}
    AI: {assistant message}
    Human: {user message}
    AI:

The model writes after the last ``AI:``; generation stops at the next speaker marker (a new line starting with
``Human:`` or ``AI:``), and the reply is that text, stripped. Speaker names are configurable
(:class:`ChatTemplate`). When the transcript outgrows the context window, the oldest turns are dropped (the
system text always stays) and the caller is told how many.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_SYSTEM = ("The following is a conversation between a human and an AI assistant. The assistant is helpful, "
                  "knowledgeable and friendly, and answers in a few sentences.")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """Speaker names and the default system text of the transcript layout."""

    user: str = "Human"
    assistant: str = "AI"
    system: str = DEFAULT_SYSTEM

    @property
    def stop_strings(self) -> list[str]:
        """Where a reply ends: the next line that starts a turn."""
        return [f"\n{self.user}:", f"\n{self.assistant}:"]

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The transcript of ``messages`` (``{"role", "content"}`` dicts), ending with the assistant's cue.

        A leading ``system`` message replaces the default system text; an empty one means no preamble.
        """
        check_messages(messages)
        system = self.system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        names = {"user": self.user, "assistant": self.assistant}
        lines = [f"{names[m['role']]}: {m['content'].strip()}".rstrip() for m in messages]
        if add_generation_prompt:
            lines.append(f"{self.assistant}:")
        body = "\n".join(lines)
        return f"{system.strip()}\n\n{body}" if system.strip() else body


def check_messages(messages: Sequence[dict[str, str]]) -> None:
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; give at least one {'role': 'user', 'content': ...} message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["content"], str):
            raise TypeError(f"message {i} content must be a string, got {type(m['content']).__name__}")
        check_text(m["content"], f"message {i} content")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"message {i} is a system message; only the first message may be one")


def check_text(text: str, what: str, fix: str = "decode the input as UTF-8 first") -> None:
    """Text the tokenizer can take: encodable as UTF-8. A lone surrogate is not; it is what a bad decode
    leaves, and what a command-line argument that was not UTF-8 becomes (PEP 383)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text (not UTF-8: {e.reason} at character {e.start}, "
                         f"{text[e.start:e.end]!r}); {fix}") from None


def fit_history(messages: Sequence[dict[str, str]], count_tokens: Callable[[str], int], budget: int,
                template: ChatTemplate) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest turns until the rendered transcript takes at most ``budget`` tokens.

    The system message and the last message always stay; a dropped user turn takes the assistant reply that
    followed it along, so the transcript still alternates. Returns (kept messages, number dropped); raises
    ValueError when even the system text and the last message do not fit.
    """
    messages = list(messages)
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    dropped = 0
    while count_tokens(template.render(head + turns)) > budget:
        if len(turns) <= 1:
            need = count_tokens(template.render(head + turns))
            raise ValueError(f"the system text and the last message alone take {need} tokens, more than the "
                             f"{budget} left for the prompt; shorten them or lower max_new_tokens")
        turns.pop(0)
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] == "assistant":
            turns.pop(0)
            dropped += 1
    return head + turns, dropped


def trim_notice(dropped: int, context: int) -> str:
    return (f"dropped the {dropped} oldest message{'s' if dropped != 1 else ''} to fit the {context}-token context "
            "window (the system message is kept)")


def strip_pieces(pieces: Iterator[str]) -> Iterator[str]:
    """Stream ``pieces`` without leading or trailing whitespace: joined, they equal ``"".join(pieces).strip()``.

    Whitespace at the end of what has arrived is held back until more text follows it.
    """
    held, started = "", False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        text = held + piece
        body = text.rstrip()
        held = text[len(body):]
        if body:
            yield body


class ChatSession:
    """A multi-turn conversation with an :class:`optlm.lm.LM` that keeps the history between turns.

    ``on_trim`` receives a one-line notice whenever old turns are dropped to fit the context window (default:
    a ``UserWarning``); dropped turns are forgotten. Generation keywords given here apply to every turn; those
    given to ``send`` / ``stream`` override them for that turn.
    """

    def __init__(self, lm: Any, system: str | None = None, template: ChatTemplate | None = None,
                 on_trim: Callable[[str], None] | None = None, **params: Any):
        self.lm = lm
        self.template = template or ChatTemplate()
        self.system = system
        self.params = params
        self.on_trim = on_trim or (lambda msg: warnings.warn(msg, stacklevel=4))
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        """Forget every turn (the system text stays)."""
        self.history.clear()

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        tail = [] if user_text is None else [{"role": "user", "content": user_text}]
        return head + self.history + tail

    def send(self, text: str, **params: Any) -> str:
        """Add a user message; return (and remember) the assistant's reply."""
        return "".join(self.stream(text, **params))

    def stream(self, text: str, **params: Any) -> Iterator[str]:
        """Like :meth:`send`, yielding the reply piece by piece; the turn is recorded once the reply is complete."""
        reply = ""
        for piece in self.lm.chat_stream(self.messages(text), template=self.template, on_trim=self._trimmed,
                                         **{**self.params, **params}):
            reply += piece
            yield piece
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]

    def _trimmed(self, kept: list[dict[str, str]], dropped: int, context: int) -> None:
        start = 1 if self.system is not None else 0
        self.history = kept[start:-1]  # the new user turn (last) is recorded with its reply
        self.on_trim(trim_notice(dropped, context))
