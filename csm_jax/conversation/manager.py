"""Conversation manager: persistent history -> CSM prompts that fit the model's context.

    manager = ConversationManager(open_store("sqlite:///conv.db"), generator, max_turns=16)
    cid, resumed = manager.start()                                   # or manager.start(existing_id)
    manager.add_turn(cid, speaker=1, text="Hi!", codes=user_codes, source="user")
    prompt = manager.build_prompt(cid, "Hello there.", speaker=0, max_frames=125)
    codes = generator.generate_codes(prompt.tokens, prompt.mask, max_frames=125)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from csm_jax.conversation.store import Store, Turn, UnknownConversation

if TYPE_CHECKING:
    from csm_jax.csm.generator import Generator

Rows = tuple[np.ndarray, np.ndarray]  # tokens int32 [S, K+1], mask bool [S, K+1]


class ContextFull(ValueError):
    """The target text plus the frames to generate do not fit in the model's context, even with no history."""


@dataclass(frozen=True)
class Prompt:
    """A generation prompt: history rows (oldest first) then the target text rows.
    `tokens` int32 [S, K+1], `mask` bool [S, K+1]; `context_turns` history turns included; `rows` = S."""

    tokens: np.ndarray
    mask: np.ndarray
    context_turns: int
    rows: int


class ConversationManager:
    """Conversations over a Store, and prompts for a Generator: the most recent whole turns that fit the context
    (at most `max_turns`), then the target text. Tokenised turn text is cached per turn_id (LRU, `cache_size`
    turns); turns are immutable, so the cache never goes stale. Safe to use from several threads."""

    def __init__(self, store: Store, generator: Generator, max_turns: int = 16, cache_size: int = 4096):
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 0:
            raise ValueError(f"max_turns must be a non-negative int, got {max_turns!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self.store, self.generator, self.max_turns = store, generator, max_turns
        self._cache_size = cache_size
        self._text_cache: OrderedDict[int, Rows | None] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, conversation_id: str | None = None) -> tuple[str, bool]:
        """-> (id, resumed): a new conversation when `conversation_id` is None, else that existing one."""
        if conversation_id is None:
            return self.store.create_conversation(), False
        if not self.store.has_conversation(conversation_id):
            raise UnknownConversation(conversation_id)
        return conversation_id, True

    def add_turn(self, conversation_id: str, speaker: int, text: str, codes: np.ndarray | None,
                 source: str) -> Turn:
        """Store a turn (codes: Mimi codes int [T, K'] or None); committed when this returns."""
        return self.store.add_turn(conversation_id, speaker, text, codes, source)

    def history(self, conversation_id: str, limit: int | None = None) -> list[Turn]:
        """Stored turns, oldest first; `limit`: only the most recent N."""
        return self.store.turns(conversation_id, limit)

    def _text_rows(self, turn: Turn) -> Rows | None:
        """The turn's text rows (None when it has no transcript), cached per turn_id."""
        with self._lock:
            if turn.turn_id in self._text_cache:
                self._text_cache.move_to_end(turn.turn_id)
                return self._text_cache[turn.turn_id]
        rows = self.generator.text_rows(turn.text, turn.speaker) if turn.text.strip() else None
        with self._lock:
            self._text_cache[turn.turn_id] = rows
            while len(self._text_cache) > self._cache_size:
                self._text_cache.popitem(last=False)
        return rows

    def _num_rows(self, turn: Turn) -> int:
        text = self._text_rows(turn)
        return (0 if text is None else len(text[0])) + (0 if turn.codes is None else turn.frames + 1)

    def turn_rows(self, turn: Turn) -> Rows:
        """A turn as a context segment, as Generator.prompt builds one: its text rows (when the text is not
        blank), then its audio rows (codes plus an EOS frame, when it has codes) -> tokens int32 [S, K+1], mask
        bool [S, K+1]."""
        text = self._text_rows(turn)
        parts = [] if text is None else [text]
        if turn.codes is not None:
            parts.append(self.generator.code_rows(turn.codes))
        if not parts:
            raise ValueError(f"turn {turn.turn_id} has neither text nor codes")
        return np.concatenate([t for t, _ in parts]), np.concatenate([m for _, m in parts])

    def build_prompt(self, conversation_id: str, text: str, speaker: int, max_frames: int) -> Prompt:
        """History + the target `[speaker]text` rows, leaving room for `max_frames` generated frames.

        History is the most recent whole turns, contiguous back from the newest, at most `max_turns`; it stops
        at the first turn that does not fit. Raises ContextFull when the target alone does not fit."""
        if isinstance(max_frames, bool) or not isinstance(max_frames, int | np.integer) or max_frames < 1:
            raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
        target = self.generator.text_rows(text, speaker)
        max_len = self.generator.cfg.backbone.max_seq_len
        budget = max_len - int(max_frames) - len(target[0])
        if budget < 0:
            raise ContextFull(f"target text ({len(target[0])} rows) + max_frames ({max_frames}) exceed the "
                              f"{max_len}-position context by {-budget}")
        context: list[Turn] = []
        for turn in reversed(self.history(conversation_id, self.max_turns)):
            n = self._num_rows(turn)
            if n > budget:
                break
            budget -= n
            context.append(turn)
        parts = [self.turn_rows(t) for t in reversed(context)] + [target]
        tokens = np.concatenate([t for t, _ in parts])
        mask = np.concatenate([m for _, m in parts])
        return Prompt(tokens, mask, len(context), len(tokens))
