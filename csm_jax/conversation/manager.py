"""Conversation manager: persistent history -> CSM prompts that fit the model's context.

    manager = ConversationManager(open_store("sqlite:///conv.db"), generator.prompt_format(), max_seq_len=2048)
    cid, resumed = manager.start()                                   # or manager.start(existing_id)
    manager.add_turn(cid, speaker=1, text="Hi!", codes=user_codes, source="user")
    prompt = manager.build_prompt(cid, "Hello there.", speaker=0, max_frames=125)
    codes = generator.generate_codes(prompt.tokens, prompt.mask, max_frames=125)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from csm_jax.conversation.store import Store, Turn, UnknownConversation
from csm_jax.csm.prompt import PromptFormat, voice_applies


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
    voice_turns: int = 0  # turns of a voice preset that lead the prompt


class ConversationManager:
    """Conversations over a Store, and prompts in the model's `PromptFormat`: the most recent whole turns that fit
    the `max_seq_len`-row context (at most `fmt.max_context_turns`), then the target text. Turn text ids are
    cached per turn_id (LRU, `cache_size` turns); turns are immutable, so the cache never goes stale. Safe to use
    from several threads."""

    def __init__(self, store: Store, fmt: PromptFormat, max_seq_len: int, cache_size: int = 4096):
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        self.store, self.format, self.max_seq_len = store, fmt, max_seq_len
        self._cache_size = cache_size
        self._text_cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
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

    def _text_ids(self, turn: Turn) -> np.ndarray | None:
        """The turn's text ids (None when it has no transcript), cached per turn_id."""
        with self._lock:
            if turn.turn_id in self._text_cache:
                self._text_cache.move_to_end(turn.turn_id)
                return self._text_cache[turn.turn_id]
        ids = self.format.text_ids(turn.text, turn.speaker) if turn.text.strip() else None
        with self._lock:
            self._text_cache[turn.turn_id] = ids
            while len(self._text_cache) > self._cache_size:
                self._text_cache.popitem(last=False)
        return ids

    def turn_rows(self, turn: Turn) -> tuple[np.ndarray, np.ndarray]:
        """A turn as a context segment (`PromptFormat.turn_rows`) -> tokens int32 [S, K+1], mask bool [S, K+1]."""
        if self._text_ids(turn) is None and turn.codes is None:
            raise ValueError(f"turn {turn.turn_id} has neither text nor codes")
        return self.format.turn_rows(self._text_ids(turn), turn.codes)

    def build_prompt(self, conversation_id: str | None, text: str, speaker: int, max_frames: int,
                     voice: Sequence[tuple[str, np.ndarray]] = ()) -> Prompt:
        """History (none for `conversation_id` None) + the target `[speaker]text` rows, leaving room for
        `max_frames` generated frames (the context rule of `PromptFormat.select_context`). `voice`: a preset's turns
        (transcript, codes int [T, K']), spoken as `speaker` first when the recent turns hold no audio of
        `speaker` (`voice_applies`; `PromptFormat.conversation_rows` places them). Raises ContextFull when the target alone does not fit."""
        if isinstance(max_frames, bool) or not isinstance(max_frames, int | np.integer) or max_frames < 1:
            raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
        target = self.format.text_rows(text, speaker)
        budget = self.max_seq_len - int(max_frames) - len(target[0])
        if budget < 0:
            raise ContextFull(f"target text ({len(target[0])} rows) + max_frames ({max_frames}) exceed the "
                              f"{self.max_seq_len}-position context by {-budget}")
        turns = self.format.max_context_turns
        history = self.history(conversation_id, turns) if turns and conversation_id is not None else []
        reference = []
        if voice and voice_applies([(t.speaker, t.codes is not None) for t in history], speaker):
            reference = [(self.format.text_ids(text, speaker), codes) for text, codes in voice]
        (tokens, mask), kept, voiced = self.format.conversation_rows(
            [(self._text_ids(t), t.codes) for t in history], self.format.text_ids(text, speaker), budget, reference)
        return Prompt(tokens, mask, kept, len(tokens), voiced)
