"""Prepared datasets -> CSM training batches.

    dataset = Dataset.open("data/corpus")
    train, held_out = split(dataset, eval_fraction=0.1, seed=0)
    loader = Loader(train, generator.prompt_format(), batch_size=8, max_rows=2048)
    for batch in loader:          # the rest of the current epoch; loader.next_batch() never stops
        ...
    state = loader.state()        # JSON-serialisable; Loader(..., state=state) continues exactly here

Examples. Each utterance is one example's target; its context is the previous turns of its conversation (turn
numbers below its own), in the model's `PromptFormat` (`csm_jax.csm.prompt`, which the server's
`ConversationManager.build_prompt` uses too): each context turn is its text rows then its audio rows (codes plus
an all-zero end frame), oldest first, then the target's text rows and audio rows. Context is chosen by
`PromptFormat.select_context` (at most `fmt.max_context_turns` turns) within `max_rows` minus the target's rows. An utterance whose own rows (text + frames + 1) exceed `max_rows` is skipped (one warning at construction
names how many; `loader.skipped` lists their ids); it is then never context either. With `prompt_examples`, each
utterance is also the target of a second example whose only context is its own speaker's most recent earlier turn:
the one-segment voice prompt a server conversation starts with (a conversation's turns alternate between
speakers, so without these a model never sees its speaker's turn directly before its own).

Batches (numpy): `tokens` int32 [B, S, K+1] (codebooks 0..K-1, text in column K), `mask` bool [B, S, K+1],
`targets` bool [B, S] (the rows whose codes the model predicts: the target turn's audio rows including its end
frame, and with `target_turns="all"` the context turns' audio rows too, so that every row of context is also
trained on, as Sesame trains CSM on every frame), `lengths` int32 [B] (rows used; the rest are padding, all-masked), `ids` int32 [B] (the target
utterance's dataset id; -1 for a padding example). S is the smallest bucket >= the longest example in the
batch. Without `drop_last` the last batch of an epoch is padded to B with empty examples (length 0).

Order. Epoch e shuffles the examples with numpy's generator seeded (seed, e), sorts each window of
`group_batches` batches by length (so a batch's examples are of similar length), cuts the windows into
batches and shuffles the batch order. The same seed gives the same batches; `state()` records
(seed, epoch, batch position) and restoring it continues with exactly the batches an uninterrupted run would
produce next.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from csm_jax.csm.prompt import PromptFormat
from csm_jax.data.prepare import DATASET_FILE, FORMAT_VERSION, INDEX_FILE, shard_name

STATE_VERSION = 1


class DatasetError(ValueError):
    """A prepared dataset directory is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class Entry:
    """One utterance of a prepared dataset (a line of index.jsonl)."""

    id: int
    conversation: str
    turn: int
    speaker: int
    text: str
    audio: str
    samples: int
    frames: int
    shard: int
    offset: int
    text_offset: int
    text_len: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _npz_array(path: Path, name: str, mmap: bool) -> np.ndarray:
    """One array of an .npz; memory-mapped when it is stored uncompressed (as np.savez writes it)."""
    if mmap:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(name + ".npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] == b"PK\x03\x04":
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    f.seek(info.header_offset + 30 + name_len + extra_len)
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                    offset = f.tell()
                    if not dtype.hasobject and int(np.prod(shape)) > 0:
                        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                         order="F" if fortran else "C")
    with np.load(path) as z:
        return z[name]


class Dataset:
    """A prepared dataset (see `csm_jax.data.prepare`), or a subset of one's conversations.

    `entries[i]` describes utterance i; `codes(i)` int16 [frames, K]; `text_ids(i)` int32 (BOS `[speaker]text`
    EOS, as `PromptFormat.text_ids` makes them); `conversations` maps a conversation to its entry positions in turn
    order. Codes are memory-mapped from the shard files by default."""

    def __init__(self, root: Path, meta: dict[str, Any], entries: list[Entry],
                 codes: dict[int, np.ndarray], text: dict[int, np.ndarray]):
        self.root, self.meta, self.entries = root, meta, entries
        self._codes, self._text = codes, text
        self.conversations: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            self.conversations.setdefault(e.conversation, []).append(i)
        for members in self.conversations.values():
            members.sort(key=lambda i: entries[i].turn)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mmap: bool = True) -> "Dataset":
        root = Path(path)
        meta_path = root / DATASET_FILE
        if not meta_path.is_file():
            raise DatasetError(f"no prepared dataset at {root} ({DATASET_FILE} not found)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise DatasetError(f"{meta_path}: format {meta.get('format')}, this code reads {FORMAT_VERSION}")
        if not meta.get("complete"):
            raise DatasetError(f"dataset at {root} is incomplete (preparation was interrupted); rerun prepare")
        names = {f.name for f in fields(Entry)}
        with open(root / INDEX_FILE, encoding="utf-8") as f:
            entries = [Entry(**{k: v for k, v in json.loads(line).items() if k in names}) for line in f if line.strip()]
        if not entries:
            raise DatasetError(f"dataset at {root} is empty")
        codes, text = {}, {}
        for s in sorted({e.shard for e in entries}):
            shard = root / shard_name(s)
            if not shard.is_file():
                raise DatasetError(f"dataset at {root} lacks {shard.name}; rerun prepare")
            codes[s] = _npz_array(shard, "codes", mmap)
            text[s] = _npz_array(shard, "text_ids", mmap=False)
        return cls(root, meta, entries, codes, text)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Entry:
        return self.entries[i]

    @property
    def num_codebooks(self) -> int:
        return int(self.meta["num_codebooks"])

    @property
    def frame_rate(self) -> float:
        return float(self.meta["frame_rate"])

    def codes(self, i: int) -> np.ndarray:
        e = self.entries[i]
        return self._codes[e.shard][e.offset:e.offset + e.frames]

    def text_ids(self, i: int) -> np.ndarray:
        e = self.entries[i]
        return self._text[e.shard][e.text_offset:e.text_offset + e.text_len]

    def subset(self, conversations: Iterable[str]) -> "Dataset":
        """The entries of these conversations (dataset order kept), sharing this dataset's arrays."""
        keep = set(conversations)
        unknown = keep - set(self.conversations)
        if unknown:
            raise KeyError(f"unknown conversation(s): {sorted(unknown)[:10]}")
        return Dataset(self.root, self.meta, [e for e in self.entries if e.conversation in keep],
                       self._codes, self._text)


def held_out_conversations(names: Iterable[str], count: int, seed: int = 0) -> set[str]:
    """The `count` conversations held out for evaluation: a seeded draw from the sorted names (the one rule shared
    by the CSM loader and the codec trainer, so both hold out the same conversations of a corpus)."""
    names = sorted(set(names))
    if not 1 <= count < len(names):
        raise ValueError(f"cannot hold out {count} of {len(names)} conversations and keep some for training")
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[i] for i in order[:count]}


def split(dataset: Dataset, eval_fraction: float | None = None, eval_conversations: int | Iterable[str] | None = None,
          seed: int = 0) -> tuple[Dataset, Dataset]:
    """-> (train, eval), held out by whole conversations. Give `eval_fraction` (of the conversations, at least
    one) or `eval_conversations` (a count, drawn with `seed`, or the conversation ids themselves)."""
    if (eval_fraction is None) == (eval_conversations is None):
        raise ValueError("give exactly one of eval_fraction or eval_conversations")
    names = sorted(dataset.conversations)
    if eval_fraction is not None or isinstance(eval_conversations, int):
        if eval_fraction is not None:
            if not 0 < eval_fraction < 1:
                raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
            count = max(1, round(eval_fraction * len(names)))
        else:
            count = eval_conversations
        held = held_out_conversations(names, count, seed)
    else:
        held = set(eval_conversations)
        if not held or held >= set(names):
            raise ValueError("eval_conversations must be a non-empty proper subset of the conversations")
    return dataset.subset(n for n in names if n not in held), dataset.subset(held)


def default_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two from 64 below max_rows, then max_rows itself."""
    out, b = [], 64
    while b < max_rows:
        out.append(b)
        b *= 2
    return (*out, max_rows)


@dataclass(frozen=True)
class Example:
    target: int  # dataset position of the target utterance
    context: tuple[int, ...]  # dataset positions of the context turns, oldest first
    length: int  # rows


class Loader:
    """Batches of CSM training examples from a Dataset (see the module docstring).

    Args:
        dataset: a Dataset (or a `split` of one).
        fmt: the model's PromptFormat (tokenizer and text front end, K codebooks, audio vocabulary, context turn
            limit). When it is the format the dataset was prepared with, the stored text ids are used, else the
            texts are tokenised again. The dataset's first K codebooks are used (fewer are masked out).
        batch_size: B.
        max_rows: the longest example, in rows (the model's context length).
        buckets: allowed S values (sorted, the largest >= max_rows); default `default_buckets(max_rows)`.
        seed, shuffle: the order; shuffle=False keeps dataset order (still length-grouped within windows).
        drop_last: drop an epoch's last partial batch instead of padding it with empty examples.
        group_batches: the length-sorting window, in batches.
        target_turns: "last" (only the target turn's audio is predicted) or "all" (every turn's audio: about
            context_turns + 1 times the training signal for the same compute).
        prompt_examples: also an example per utterance with only its speaker's previous turn as context.
        state: a `state()` to continue from.
    """

    def __init__(self, dataset: Dataset, fmt: PromptFormat, batch_size: int, max_rows: int = 2048,
                 buckets: Iterable[int] | None = None, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 group_batches: int = 16, target_turns: str = "last", prompt_examples: bool = False,
                 state: dict[str, Any] | None = None):
        if target_turns not in ("last", "all"):
            raise ValueError(f"target_turns must be 'last' or 'all', got {target_turns!r}")
        if not isinstance(prompt_examples, bool):
            raise ValueError(f"prompt_examples must be true or false, got {prompt_examples!r}")
        num_codebooks, audio_vocab_size = fmt.num_codebooks, fmt.audio_vocab_size
        for name, value, low in (("batch_size", batch_size, 1), ("max_rows", max_rows, 1),
                                 ("group_batches", group_batches, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        codebook_size = int(dataset.meta["codebook_size"])
        if audio_vocab_size < codebook_size:
            raise ValueError(f"audio_vocab_size {audio_vocab_size} < the dataset's codebook size {codebook_size}")
        self.buckets = tuple(sorted(int(b) for b in buckets)) if buckets is not None else default_buckets(max_rows)
        if not self.buckets or self.buckets[0] < 1 or self.buckets[-1] < max_rows:
            raise ValueError(f"buckets must be positive with the largest >= max_rows={max_rows}, got {self.buckets}")
        self.dataset, self.format = dataset, fmt
        self.num_codebooks, self.audio_vocab_size = num_codebooks, audio_vocab_size
        self.batch_size, self.max_rows, self.context_turns = batch_size, max_rows, fmt.max_context_turns
        self.seed, self.shuffle, self.drop_last, self.group_batches = seed, shuffle, drop_last, group_batches
        self.target_turns, self.prompt_examples = target_turns, prompt_examples

        if dataset.meta["fingerprint"].get("format_sha256") == fmt.fingerprint():
            self._text_ids = [dataset.text_ids(i) for i in range(len(dataset))]
        else:
            self._text_ids = [fmt.text_ids(e.text, e.speaker) for e in dataset.entries]
        self.examples, self.skipped = self._build_examples()
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} of {len(dataset)} utterances are longer than max_rows={max_rows} "
                          "(text rows + frames + end frame) and are skipped", stacklevel=2)
        if not self.examples:
            raise ValueError(f"no utterance fits in max_rows={max_rows}")
        n = len(self.examples)
        self.batches_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"drop_last with {n} examples < batch_size {batch_size} leaves no batch")
        self._lengths = np.array([ex.length for ex in self.examples], np.int64)
        self._fingerprint = self._make_fingerprint()
        self.epoch, self.position = 0, 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        if state is not None:
            self.restore(state)

    # examples --------------------------------------------------------------------------------------------
    def _turn_rows(self, i: int) -> int:
        return self.format.turn_length(len(self._text_ids[i]), self.dataset.entries[i].frames)

    def _build_examples(self) -> tuple[list[Example], list[int]]:
        examples, skipped = [], []
        position_in_conv = {}
        for members in self.dataset.conversations.values():
            for j, i in enumerate(members):
                position_in_conv[i] = j
        for i, e in enumerate(self.dataset.entries):
            own = self._turn_rows(i)
            if own > self.max_rows:
                skipped.append(e.id)
                continue
            earlier = self.dataset.conversations[e.conversation][:position_in_conv[i]]
            kept = self.format.select_context([self._turn_rows(m) for m in earlier], self.max_rows - own)
            context = tuple(earlier[len(earlier) - kept:])
            examples.append(Example(i, context, own + sum(self._turn_rows(m) for m in context)))
            same = [m for m in earlier if self.dataset.entries[m].speaker == e.speaker]
            if self.prompt_examples and same and context != (same[-1],) and \
                    own + self._turn_rows(same[-1]) <= self.max_rows:
                examples.append(Example(i, (same[-1],), own + self._turn_rows(same[-1])))
        return examples, skipped

    def _make_fingerprint(self) -> str:
        batching = [self.batch_size, self.shuffle, self.drop_last, self.group_batches]
        h = hashlib.sha256(json.dumps(batching + ([self.target_turns] if self.target_turns != "last" else [])).encode())
        for ex in self.examples:
            h.update(json.dumps([self.dataset.entries[ex.target].id, ex.length,
                                 [self.dataset.entries[c].id for c in ex.context]]).encode())
        return h.hexdigest()[:16]

    def example_rows(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Example k (an index into `examples`) -> tokens int32 [L, K+1], mask bool [L, K+1], targets bool [L]."""
        ex = self.examples[k]
        tokens = np.zeros((ex.length, self.num_codebooks + 1), np.int32)
        mask = np.zeros_like(tokens, dtype=bool)
        targets = np.zeros((ex.length,), bool)
        self._fill(ex, tokens, mask, targets)
        return tokens, mask, targets

    def _fill(self, ex: Example, tokens: np.ndarray, mask: np.ndarray, targets: np.ndarray) -> None:
        pos = 0
        for i in (*ex.context, ex.target):
            ids = self._text_ids[i]
            t, m = self.format.turn_rows(ids, self.dataset.codes(i)[:, :self.num_codebooks].astype(np.int32))
            tokens[pos:pos + len(t)], mask[pos:pos + len(t)] = t, m
            if i == ex.target or self.target_turns == "all":
                targets[pos + len(ids):pos + len(t)] = True
            pos += len(t)

    # order -----------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Epoch `epoch`'s batches, each an int array of example indices (into `examples`)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        n, b = len(self.examples), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        window = b * self.group_batches
        batches = []
        for w in range(0, n, window):
            chunk = order[w:w + window]
            chunk = chunk[np.argsort(self._lengths[chunk], kind="stable")]
            batches.extend(chunk[j:j + b] for j in range(0, len(chunk), b))
        if self.drop_last:
            batches = [x for x in batches if len(x) == b]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        self._plan_cache = (epoch, batches)
        return batches

    def collate(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Example indices -> the batch dict (padded to batch_size with empty examples)."""
        lengths = np.zeros((self.batch_size,), np.int32)
        lengths[:len(batch)] = self._lengths[batch]
        s = next(x for x in self.buckets if x >= lengths.max())
        k = self.num_codebooks
        tokens = np.zeros((self.batch_size, s, k + 1), np.int32)
        mask = np.zeros((self.batch_size, s, k + 1), bool)
        targets = np.zeros((self.batch_size, s), bool)
        ids = np.full((self.batch_size,), -1, np.int32)
        for r, j in enumerate(batch):
            ex = self.examples[j]
            self._fill(ex, tokens[r], mask[r], targets[r])
            ids[r] = self.dataset.entries[ex.target].id
        return {"tokens": tokens, "mask": mask, "targets": targets, "lengths": lengths, "ids": ids}

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _roll(self) -> list[np.ndarray]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return self.epoch_batches(self.epoch)

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next batch, moving on to the next epoch after the last one (never stops)."""
        batches = self._roll()
        batch = batches[self.position]
        self.position += 1
        return self.collate(batch)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """The remaining batches of the current epoch (a whole epoch when at its start)."""
        batches = self._roll()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield self.collate(batch)

    # resume ----------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Where the loader is: the next batch it yields is batch `batch` of epoch `epoch` (JSON-serialisable)."""
        epoch, position = self.epoch, self.position
        if position >= self.batches_per_epoch:
            epoch, position = epoch + 1, 0
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": epoch, "batch": position,
                "fingerprint": self._fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`; the loader must be built the same way (dataset, max_rows, batch_size, ...).
        The state's seed is adopted."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a loader state (version {STATE_VERSION}): {state!r}")
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError("loader state is from a loader over other examples or with other batching "
                             "(dataset, max_rows, context_turns, batch_size, shuffle, drop_last or group_batches)")
        epoch, position, seed = state["epoch"], state["batch"], state["seed"]
        if not all(isinstance(v, int) and v >= 0 for v in (epoch, position, seed)) or \
                position > self.batches_per_epoch:
            raise ValueError(f"invalid loader state: {state!r}")
        self.seed, self.epoch, self.position, self._plan_cache = seed, epoch, position, None
