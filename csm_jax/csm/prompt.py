"""The CSM conversation format, in one place: how turns become prompt rows, and which turns fit as context.

Rows have K+1 columns: K audio codebooks, then text. A text turn is `<|begin_of_text|>[speaker]text<|end_of_text|>`
(after the model's text front end, e.g. phonemes), one token per row in column K; an audio turn is one row per
Mimi frame in columns 0..K-1 followed by an all-zero end frame. Masks mark the filled columns. A context turn is
its text rows, then its audio rows (when it has audio). Context is the most recent whole turns, contiguous back
from the target, at most `max_context_turns`, that fit the row budget; it stops at the first turn that does not.
A voice preset (`csm_jax.csm.voices`: reference turns of the target speaker) prompts a turn whose context holds no
audio of its speaker (`voice_applies`). Its turns go first, as the oldest context: its newest turn before any history
(left out only when it alone does not fit), then the history in the turns and rows left, then the preset's older
turns in what the history leaves.

The generator, the conversation manager (server), the training data loader and evaluation all build prompts
with a `PromptFormat`, so a model is served exactly as it was trained.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from csm_jax.csm.frontend import TextFrontend, make_frontend

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
Rows = tuple[np.ndarray, np.ndarray]  # tokens int32 [S, K+1], mask bool [S, K+1]
# A checkpoint's prompt settings (beside its tokenizer.json): {"frontend": ..., "max_context_turns": ...}, what the
# model was trained with. Checkpoints without it (e.g. the official CSM-1B) use plain text and 16 context turns.
PROMPT_FILE = "prompt.json"
PROMPT_KEYS = ("frontend", "max_context_turns")


def read_prompt_settings(directory: str | Path) -> dict[str, Any]:
    """`<directory>/prompt.json` as PromptFormat keyword arguments ({} when there is none); bad files raise."""
    path = Path(directory) / PROMPT_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    unknown = set(settings) - set(PROMPT_KEYS) if isinstance(settings, dict) else {"(not an object)"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {list(PROMPT_KEYS)}")
    return settings


class PromptFormat:
    """tokenizer: with BOS/EOS special tokens; num_codebooks: K; audio_vocab_size: the audio embedding rows;
    frontend: "text", "espeak:<voice>" or a TextFrontend; max_context_turns: the context turn limit."""

    def __init__(self, tokenizer: Tokenizer, num_codebooks: int, audio_vocab_size: int,
                 frontend: str | TextFrontend | None = None, max_context_turns: int = 16) -> None:
        bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
        if bos is None or eos is None:
            raise ValueError(f"tokenizer lacks {BOS} / {EOS}")
        if isinstance(max_context_turns, bool) or not isinstance(max_context_turns, int) or max_context_turns < 0:
            raise ValueError(f"max_context_turns must be a non-negative int, got {max_context_turns!r}")
        self.tokenizer, self.num_codebooks, self.audio_vocab_size = tokenizer, num_codebooks, audio_vocab_size
        self.frontend = frontend if callable(frontend) else make_frontend(frontend)
        self.max_context_turns = max_context_turns
        self._bos, self._eos = bos, eos

    def with_context(self, max_context_turns: int) -> "PromptFormat":
        """The same format with another context turn limit."""
        return PromptFormat(self.tokenizer, self.num_codebooks, self.audio_vocab_size, self.frontend,
                            max_context_turns)

    def settings(self) -> dict[str, Any]:
        """What `PROMPT_FILE` stores for this format (the tokenizer is saved apart, as tokenizer.json)."""
        return {"frontend": self.frontend.name, "max_context_turns": self.max_context_turns}

    def fingerprint(self) -> str:
        """Identifies the text ids this format produces: the tokenizer's JSON and the front end."""
        h = hashlib.sha256(self.tokenizer.to_str().encode())
        h.update(self.frontend.name.encode())
        return h.hexdigest()

    # rows ----------------------------------------------------------------------------------------------------
    def text_ids(self, text: str, speaker: int) -> np.ndarray:
        """`[speaker]` + front end(text), with BOS/EOS -> int32 [n]."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        if isinstance(speaker, bool) or not isinstance(speaker, int | np.integer) or speaker < 0:
            raise TypeError(f"speaker must be a non-negative int, got {speaker!r}")
        body = self.tokenizer.encode(f"[{speaker}]{self.frontend(text)}", add_special_tokens=False).ids
        return np.array([self._bos, *body, self._eos], np.int32)

    def id_rows(self, ids: np.ndarray) -> Rows:
        """Text ids int [n] -> rows with the ids in column K."""
        k = self.num_codebooks
        tokens = np.zeros((len(ids), k + 1), np.int32)
        mask = np.zeros((len(ids), k + 1), bool)
        tokens[:, k], mask[:, k] = ids, True
        return tokens, mask

    def text_rows(self, text: str, speaker: int) -> Rows:
        return self.id_rows(self.text_ids(text, speaker))

    def code_rows(self, codes: np.ndarray) -> Rows:
        return code_rows(codes, self.num_codebooks, self.audio_vocab_size)

    def turn_rows(self, ids: np.ndarray | None, codes: np.ndarray | None) -> Rows:
        """A context turn: its text rows (ids; None when it has no transcript), then its audio rows (None: none)."""
        parts = ([] if ids is None else [self.id_rows(ids)]) + ([] if codes is None else [self.code_rows(codes)])
        if not parts:
            raise ValueError("a turn needs text or audio")
        return concat(parts)

    @staticmethod
    def turn_length(num_ids: int, frames: int | None) -> int:
        """Rows of a turn with `num_ids` text ids (0: none) and `frames` audio frames (None: no audio)."""
        return num_ids + (0 if frames is None else frames + 1)

    # context -------------------------------------------------------------------------------------------------
    def select_context(self, lengths: Sequence[int], budget: int, max_turns: int | None = None) -> int:
        """`lengths`: rows of the earlier turns, oldest first -> how many of the most recent to keep as context
        (at most `max_turns`, default `max_context_turns`)."""
        kept = 0
        lengths = list(lengths)
        limit = self.max_context_turns if max_turns is None else max_turns
        for n in reversed(lengths[max(0, len(lengths) - limit):] if limit > 0 else []):
            if n > budget:
                break
            budget -= n
            kept += 1
        return kept

    def conversation_rows(self, history: Sequence[tuple[np.ndarray | None, np.ndarray | None]],
                          target_ids: np.ndarray, budget: int,
                          voice: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> tuple[Rows, int, int]:
        """history: earlier turns as (text ids or None, codes int [T, K'] or None), oldest first; budget: rows
        the context may use; voice: a preset's turns (text ids as the target speaker, codes int [T, K']), oldest
        first, when `voice_applies` -> (preset rows, history rows, then the target's text rows; history turns
        kept; preset turns kept), by the module docstring's rule."""
        def length(ids: np.ndarray | None, codes: np.ndarray | None) -> int:
            return self.turn_length(0 if ids is None else len(ids), None if codes is None else len(codes))

        turns, voiced = self.max_context_turns, 0
        preset = [length(*t) for t in voice]
        if preset and turns > 0 and preset[-1] <= budget:
            voiced, budget, turns = 1, budget - preset[-1], turns - 1
        lengths = [length(*t) for t in history]
        kept = self.select_context(lengths, budget, turns)
        if voiced:
            voiced += self.select_context(preset[:-1], budget - sum(lengths[len(lengths) - kept:]), turns - kept)
        parts = [self.turn_rows(*t) for t in [*voice[len(voice) - voiced:], *history[len(history) - kept:]]]
        return concat([*parts, self.id_rows(target_ids)]), kept, voiced


def voice_applies(context: Sequence[tuple[int, bool]], speaker: int) -> bool:
    """context: the candidate context turns as (speaker, has audio) -> whether a voice preset prompts `speaker`'s
    turn: none of them is audio of that speaker."""
    return not any(s == speaker and has_audio for s, has_audio in context)


def concat(parts: Sequence[Rows]) -> Rows:
    return np.concatenate([t for t, _ in parts]), np.concatenate([m for _, m in parts])


def code_rows(codes: np.ndarray, num_codebooks: int, audio_vocab_size: int) -> Rows:
    """Audio codes int [T, K'] (K' <= K = num_codebooks) plus one all-zero end frame -> rows [T+1, K+1];
    codebooks past K' are masked out."""
    codes = np.asarray(codes)
    k = num_codebooks
    if codes.ndim != 2 or not 1 <= codes.shape[1] <= k or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be int [T, K'] with K' <= {k}, got {codes.dtype} {list(codes.shape)}")
    if codes.size and (codes.min() < 0 or codes.max() >= audio_vocab_size):
        raise ValueError(f"audio codes must be in [0, {audio_vocab_size})")
    t, kk = codes.shape
    tokens = np.zeros((t + 1, k + 1), np.int32)
    mask = np.zeros((t + 1, k + 1), bool)
    tokens[:t, :kk], mask[:, :kk] = codes, True
    return tokens, mask
