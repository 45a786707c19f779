"""Audio for codec training: a manifest's utterances resampled to the codec rate and stored as one int16 array
per split, then random fixed-length crops per step.

    prepare_audio("data/speech/corpus/manifest.jsonl", "data/speech/codec_audio", eval_conversations=40)
    bank = AudioBank.open("data/speech/codec_audio", "train")
    batch = bank.crops(step=0, batch_size=8, length=23040, seed=0)     # float32 [8, 23040]

Crops depend only on (seed, step), so resuming at a step reproduces the exact batches with no loader state.
Held-out conversations are chosen by `csm_jax.data.loader.held_out_conversations`, as the CSM loader does.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from csm_jax.audio.processor import load_audio
from csm_jax.data.loader import held_out_conversations
from csm_jax.data.manifest import read_manifest

FORMAT = 1
SPLITS = ("train", "eval")


class AudioBankError(ValueError):
    """Prepared audio is missing, stale or unreadable."""


def _fingerprint(manifest: Path, sample_rate: int, eval_conversations: int, seed: int) -> str:
    h = hashlib.sha256(manifest.read_bytes())
    h.update(json.dumps([FORMAT, sample_rate, eval_conversations, seed]).encode())
    return h.hexdigest()


def prepare_audio(manifest: str | os.PathLike[str], out_dir: str | os.PathLike[str], eval_conversations: int,
                  seed: int = 0, sample_rate: int = 24_000, workers: int | None = None,
                  progress: bool = True) -> Path:
    """Read every utterance of `manifest` (any format and rate, mono-mixed, resampled) into
    `<out_dir>/{train,eval}.npy` (int16, concatenated) + `{split}.json` (offsets, lengths, keys, texts,
    speakers). Up-to-date output (same manifest bytes and settings) is kept as is. Returns `out_dir`."""
    manifest, out = Path(manifest), Path(out_dir)
    utterances = read_manifest(manifest)
    fingerprint = _fingerprint(manifest, sample_rate, eval_conversations, seed)
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") == fingerprint:
        return out
    held = held_out_conversations({u.conversation for u in utterances}, eval_conversations, seed)
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    load = lambda u: load_audio(u.audio, sample_rate=sample_rate)  # noqa: E731
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        audios = list(tqdm(pool.map(load, utterances), total=len(utterances), desc="load audio",
                           disable=not progress))
    summary = {}
    for split in SPLITS:
        chosen = [i for i, u in enumerate(utterances) if (u.conversation in held) == (split == "eval")]
        lengths = np.array([len(audios[i]) for i in chosen], np.int64)
        data = np.concatenate([np.clip(audios[i], -1, 1) for i in chosen]) if chosen else np.zeros(0, np.float32)
        tmp = out / f"{split}.tmp.npy"
        np.save(tmp, np.round(data * 32767).astype(np.int16))
        os.replace(tmp, out / f"{split}.npy")
        index = {"offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist(), "lengths": lengths.tolist(),
                 "keys": [list(utterances[i].key) for i in chosen], "texts": [utterances[i].text for i in chosen],
                 "speakers": [utterances[i].speaker for i in chosen]}
        (out / f"{split}.json").write_text(json.dumps(index))
        summary[split] = {"utterances": len(chosen), "hours": float(lengths.sum()) / sample_rate / 3600}
    meta = {"format": FORMAT, "fingerprint": fingerprint, "sample_rate": sample_rate, "manifest": str(manifest),
            "eval_conversations": eval_conversations, "seed": seed, "splits": summary}
    tmp = out / "meta.tmp.json"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return out


class AudioBank:
    """One split of prepared audio: `audio` int16 [total] (memory-mapped), per-utterance offsets and lengths."""

    def __init__(self, audio: np.ndarray, index: dict[str, Any], sample_rate: int) -> None:
        self.audio = audio
        self.offsets = np.asarray(index["offsets"], np.int64)
        self.lengths = np.asarray(index["lengths"], np.int64)
        self.texts: list[str] = index["texts"]
        self.speakers: list[int] = index["speakers"]
        self.keys = [tuple(k) for k in index["keys"]]
        self.sample_rate = sample_rate
        if not len(self.lengths):
            raise AudioBankError("the split holds no utterances")

    @classmethod
    def open(cls, path: str | os.PathLike[str], split: str) -> "AudioBank":
        root = Path(path)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise AudioBankError(f"{root} holds no prepared codec audio (run train/prepare_codec.py first)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise AudioBankError(f"{root}: prepared with format {meta.get('format')}, expected {FORMAT}")
        try:
            audio = np.load(root / f"{split}.npy", mmap_mode="r")
            index = json.loads((root / f"{split}.json").read_text())
        except (OSError, ValueError) as e:
            raise AudioBankError(f"{root}: unreadable {split} split ({e})") from e
        return cls(audio, index, int(meta["sample_rate"]))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def hours(self) -> float:
        return float(self.lengths.sum()) / self.sample_rate / 3600

    def utterance(self, i: int) -> np.ndarray:
        """float32 [length_i] in [-1, 1]."""
        o = self.offsets[i]
        return np.asarray(self.audio[o : o + self.lengths[i]], np.float32) / 32767

    def crops(self, step: int, batch_size: int, length: int, seed: int = 0) -> np.ndarray:
        """float32 [batch_size, length]: utterances drawn in proportion to their length, each cropped at a random
        offset (zero-padded when shorter). Deterministic in (seed, step)."""
        rng = np.random.default_rng([seed, step])
        weights = self.lengths / self.lengths.sum()
        picks = rng.choice(len(self.lengths), size=batch_size, p=weights)
        out = np.zeros((batch_size, length), np.float32)
        for row, i in enumerate(picks):
            n = int(self.lengths[i])
            start = int(rng.integers(0, max(n - length, 0) + 1))
            piece = self.audio[self.offsets[i] + start : self.offsets[i] + start + min(length, n)]
            out[row, : len(piece)] = np.asarray(piece, np.float32) / 32767
        return out
