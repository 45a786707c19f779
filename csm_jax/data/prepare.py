"""Corpus preparation: manifest -> audio processor -> batched Mimi encode -> sharded codes + text ids + index.

    summary = prepare("corpus/manifest.jsonl", "data/corpus", codec, generator.prompt_format(), num_codebooks=8)

Output directory:
  dataset.json        format version, config fingerprint (codec config + weights hash, num_codebooks, prompt
                      format (tokenizer + text front end), manifest, shard_size) and `complete`
  shard-00000.npz     `codes` int16 [frames, K] (the shard's utterances back to back), `code_offsets` int64 [n+1],
                      `text_ids` int32 (each utterance's `PromptFormat.text_ids`: BOS, `[speaker]`
                      front end(text), EOS), `text_offsets` int64 [n+1], `meta` (a JSON string: per-utterance metadata)
  index.jsonl         one line per utterance: id, conversation, turn, speaker, text, audio, samples, frames,
                      shard, offset (code row in the shard), text_offset, text_len, extra
  summary.json        `Summary`

Shard i holds manifest utterances [i * shard_size, (i + 1) * shard_size). Each shard is written atomically (a
temporary file, then rename), so a shard file that exists is complete: rerunning skips them and only encodes
the missing ones (`force=True` starts over). An out_dir prepared with another fingerprint raises `PrepareError`, and so does
audio that `load_audio` cannot read (or longer than its 600 s limit), naming the manifest line and file.

Encoding: every utterance's audio is zero-padded to a whole number of codec frames (ceil(N / frame_size)); such
audio is then batched by length bucket (a ladder 8, 12, 16, 24, 32, 48, ... frames; a bucket's batch size is
batch_seconds of padded audio, its last batch padded with silent rows) so the jitted encoder compiles one shape
per bucket. Mimi is causal, so the codes of each
utterance equal `codec.encode` of its own zero-padded audio alone, which is also what the streaming encoder (and
so the server's PCM audio turns) produce. Note that `codec.encode` of the raw unpadded audio may differ in the
last frame when N is not a multiple of frame_size (offline Mimi pads its intermediate activations at the end).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from csm_jax.audio.processor import AudioError, load_audio
from csm_jax.codec.codec import MimiCodec
from csm_jax.codec.mimi import determines_codes
from csm_jax.csm.prompt import PromptFormat
from csm_jax.data.manifest import Utterance, read_manifest

FORMAT_VERSION = 1
DATASET_FILE, INDEX_FILE, SUMMARY_FILE = "dataset.json", "index.jsonl", "summary.json"


class PrepareError(ValueError):
    """Preparation cannot proceed: unreadable audio, a foreign or mismatched out_dir, bad arguments."""


@dataclass(frozen=True)
class Summary:
    """What a prepared dataset holds. `seconds`/`hours` count the audio itself (before frame padding)."""

    utterances: int
    conversations: int
    speakers: int
    frames: int
    seconds: float
    hours: float
    shards: int
    num_codebooks: int
    frame_rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rows = [("audio", f"{self.hours:.3f} h ({self.seconds:.1f} s)"),
                ("frames", f"{self.frames:,} x {self.num_codebooks} codebooks at {self.frame_rate:g} Hz"),
                ("utterances", f"{self.utterances:,}"), ("conversations", f"{self.conversations:,}"),
                ("speakers", f"{self.speakers:,}"), ("shards", f"{self.shards:,}")]
        return "\n".join(["prepared dataset:"] + [f"  {name:<14}{value}" for name, value in rows])


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npz"


def bucket_frames(frames: int) -> int:
    """Smallest rung of the ladder 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5x them) that is >= frames."""
    rung = 8
    while True:
        if rung >= frames:
            return rung
        if rung * 3 // 2 >= frames:
            return rung * 3 // 2
        rung *= 2


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def codec_fingerprint(codec: MimiCodec) -> dict[str, Any]:
    """The codec's config and a hash of the weights that determine its codes (path, dtype, shape and bytes of every
    encoder-side parameter), so a codec whose decoder trained further still reads the same prepared codes."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(codec.params)[0]
    leaves = [(p, x) for p, x in leaves if determines_codes(tuple(str(getattr(k, "key", k)) for k in p))]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return {"config": codec.config.to_dict(), "encoder_sha256": h.hexdigest()}


def _manifest_fingerprint(utterances: list[Utterance]) -> str:
    rows = [[str(u.audio), u.text, u.speaker, u.conversation, u.turn] for u in utterances]
    return _sha256(json.dumps(rows, ensure_ascii=False).encode())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _check_out_dir(out: Path, fingerprint: dict[str, Any], force: bool) -> None:
    """Raise unless out_dir is empty, ours (same fingerprint) or force; with force, remove previous outputs."""
    meta_path = out / DATASET_FILE
    ours = [*out.glob("shard-*.npz"), *out.glob("*.tmp"), out / INDEX_FILE, out / SUMMARY_FILE, meta_path]
    if force:
        for p in ours:
            p.unlink(missing_ok=True)
        return
    if meta_path.is_file():
        try:
            previous = json.loads(meta_path.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PrepareError(f"{meta_path} is unreadable ({e}); use force=True to start over") from None
        if previous != fingerprint:
            keys = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            details = []
            for k in keys:
                if k == "codec":
                    old, new = previous.get(k) or {}, fingerprint[k]
                    details.append("codec config" if old.get("config") != new["config"] else "codec encoder weights")
                elif k == "format_sha256":
                    details.append("prompt format (tokenizer or text front end)")
                elif k in ("num_codebooks", "shard_size", "format"):
                    details.append(f"{k} {previous.get(k)} (now {fingerprint.get(k)})")
                else:
                    details.append(k)
            raise PrepareError(f"{out} holds a dataset prepared with a different {', '.join(details)}; "
                               "use another out_dir, or force=True to redo it")
    elif any(out.glob("shard-*.npz")):
        raise PrepareError(f"{out} holds shards but no {DATASET_FILE}; use force=True to start over")


def _load(u: Utterance) -> np.ndarray:
    try:
        return load_audio(u.audio)
    except AudioError as e:
        raise PrepareError(f"{u.source}: cannot read audio {u.audio}: {e}") from e


def _encode_shard(utts: list[Utterance], codec: MimiCodec, fmt: PromptFormat, batch_seconds: float,
                  pool: ThreadPoolExecutor, pbar: Any) -> tuple[bytes, list[dict[str, Any]]]:
    """Load, encode and pack one shard -> (npz bytes, per-utterance metadata)."""
    fs = codec.frame_size
    audio = list(pool.map(_load, utts))
    frames = [codec.num_frames(len(a)) for a in audio]
    codes: list[np.ndarray | None] = [None] * len(utts)
    by_bucket: dict[int, list[int]] = {}
    for i, f in enumerate(frames):
        by_bucket.setdefault(bucket_frames(f), []).append(i)
    for bucket, members in sorted(by_bucket.items()):
        members.sort(key=lambda i: frames[i])
        per_batch = max(1, int(batch_seconds * codec.frame_rate) // bucket)
        for start in range(0, len(members), per_batch):
            chunk = members[start:start + per_batch]
            batch = np.zeros((per_batch, bucket * fs), np.float32)  # one shape per bucket
            for r, i in enumerate(chunk):
                batch[r, :len(audio[i])] = audio[i]
            out = np.asarray(codec.encode(batch))  # int32 [per_batch, K, bucket]
            for r, i in enumerate(chunk):
                codes[i] = out[r, :, :frames[i]].T.astype(np.int16)
            pbar.update(len(chunk))
    text_ids = [fmt.text_ids(u.text, u.speaker) for u in utts]
    code_offsets = np.concatenate([[0], np.cumsum(frames)]).astype(np.int64)
    text_offsets = np.concatenate([[0], np.cumsum([len(t) for t in text_ids])]).astype(np.int64)
    meta = [{"conversation": u.conversation, "turn": u.turn, "speaker": u.speaker, "text": u.text,
             "audio": str(u.audio), "samples": len(a), "frames": f, "text_len": len(t), "extra": dict(u.extra)}
            for u, a, f, t in zip(utts, audio, frames, text_ids)]
    arrays = {"codes": np.concatenate(codes), "code_offsets": code_offsets,
              "text_ids": np.concatenate(text_ids).astype(np.int32), "text_offsets": text_offsets,
              "meta": np.array(json.dumps(meta, ensure_ascii=False))}
    return _npz_bytes(arrays), meta


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz (what np.savez writes, readable by np.load) with fixed timestamps, so the same
    shard gives the same bytes; uncompressed members can be memory-mapped."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr, order="C"), allow_pickle=False)
    return buf.getvalue()


def _read_shard_meta(path: Path, utts: list[Utterance]) -> list[dict[str, Any]] | None:
    """The metadata of a completed shard, or None when it is unreadable or holds other utterances."""
    try:
        with np.load(path) as z:
            meta = json.loads(z["meta"].item())
            n_codes, n_text = len(z["code_offsets"]), len(z["text_offsets"])
    except (OSError, ValueError, KeyError, AttributeError, zipfile.BadZipFile):
        return None
    if n_codes != len(utts) + 1 or n_text != len(utts) + 1 or \
            [(m["conversation"], m["turn"]) for m in meta] != [u.key for u in utts]:
        return None
    return meta


def conversation_roles(utts: list[Utterance]) -> list[Utterance]:
    """Speaker ids renumbered per conversation by first appearance in turn order; the old id goes to
    `extra["voice_id"]`."""
    roles: dict[str, dict[int, int]] = {}
    for u in sorted(utts, key=lambda u: (u.conversation, u.turn)):
        conv = roles.setdefault(u.conversation, {})
        conv.setdefault(u.speaker, len(conv))
    return [replace(u, speaker=roles[u.conversation][u.speaker],
                                extra=MappingProxyType({**u.extra, "voice_id": u.speaker})) for u in utts]


def prepare(manifest_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], codec: MimiCodec,
            fmt: PromptFormat, num_codebooks: int | None = None, *, audio_vocab_size: int | None = None,
            shard_size: int = 512, batch_seconds: float = 120.0, force: bool = False, progress: bool = True,
            workers: int = 4, speakers: str = "manifest") -> Summary:
    """Prepare a manifest's corpus into `out_dir` (see the module docstring) -> its Summary.

    Args:
        codec: the Mimi codec; `num_codebooks` (default: the codec's) codebooks are kept per frame.
        fmt: the model's PromptFormat (its tokenizer and text front end make the text ids).
        audio_vocab_size: if given, checked to hold the codec's codebook size (CSM-1B: 2051 >= 2048).
        shard_size: utterances per shard file (a shard's audio is held in memory while it is encoded).
        batch_seconds: padded audio seconds per encoder call (the batch size of each length bucket).
        force: discard whatever out_dir holds and prepare from scratch.
        progress: show a tqdm bar and print the summary.
        workers: threads that load and resample audio.
        speakers: "manifest" keeps the manifest's speaker ids; "roles" renumbers them per conversation in order of
            first appearance (0, 1, ...), as CSM's speaker ids are conversation roles, so a model must take a
            speaker's voice from the context audio (voice prompting) rather than from a global id. The manifest's
            id is kept as `extra["voice_id"]`.
    """
    k = codec.num_codebooks if num_codebooks is None else num_codebooks
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= codec.config.num_quantizers:
        raise PrepareError(f"num_codebooks must be an int in 1..{codec.config.num_quantizers}, got {k!r}")
    if codec.config.codebook_size > np.iinfo(np.int16).max:
        raise PrepareError(f"codebook_size {codec.config.codebook_size} does not fit int16 shards")
    if audio_vocab_size is not None and audio_vocab_size < codec.config.codebook_size:
        raise PrepareError(f"audio_vocab_size {audio_vocab_size} < codec codebook_size {codec.config.codebook_size}")
    if shard_size < 1 or batch_seconds <= 0:
        raise PrepareError("shard_size and batch_seconds must be positive")
    if speakers not in ("manifest", "roles"):
        raise PrepareError(f"speakers must be 'manifest' or 'roles', got {speakers!r}")
    utts = read_manifest(manifest_path)
    if speakers == "roles":
        utts = conversation_roles(utts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {"format": FORMAT_VERSION, "codec": codec_fingerprint(codec), "num_codebooks": k,
                   "speakers": speakers,
                   "format_sha256": fmt.fingerprint(), "manifest_sha256": _manifest_fingerprint(utts),
                   "shard_size": shard_size}
    _check_out_dir(out, fingerprint, force)
    base = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "num_codebooks": k,
            "sample_rate": codec.sample_rate, "frame_rate": codec.frame_rate, "frame_size": codec.frame_size,
            "codebook_size": codec.config.codebook_size, "manifest": str(Path(manifest_path).resolve())}
    _atomic_write_json(out / DATASET_FILE, {**base, "complete": False})
    (out / INDEX_FILE).unlink(missing_ok=True)
    encoder = codec if codec.num_codebooks == k else MimiCodec(codec.params, codec.config, k)

    plan = [utts[i:i + shard_size] for i in range(0, len(utts), shard_size)]
    metas: list[list[dict[str, Any]]] = []
    with tqdm(total=len(utts), desc="prepare", unit="utt", disable=not progress) as pbar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, shard in enumerate(plan):
            path = out / shard_name(i)
            meta = _read_shard_meta(path, shard) if path.is_file() else None
            if meta is None:
                data, meta = _encode_shard(shard, encoder, fmt, batch_seconds, pool, pbar)
                _atomic_write_bytes(path, data)
            else:
                pbar.update(len(shard))
            metas.append(meta)

    index, uid = [], 0
    for s, meta in enumerate(metas):
        offset = text_offset = 0
        for m in meta:
            text_len = m["text_len"]
            index.append({"id": uid, "conversation": m["conversation"], "turn": m["turn"], "speaker": m["speaker"],
                          "text": m["text"], "audio": m["audio"], "samples": m["samples"], "frames": m["frames"],
                          "shard": s, "offset": offset, "text_offset": text_offset, "text_len": text_len,
                          "extra": m["extra"]})
            uid, offset, text_offset = uid + 1, offset + m["frames"], text_offset + text_len
    _atomic_write_bytes(out / INDEX_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in index).encode())
    seconds = sum(r["samples"] for r in index) / codec.sample_rate
    summary = Summary(utterances=len(index), conversations=len({r["conversation"] for r in index}),
                      speakers=len({r["speaker"] for r in index}), frames=sum(r["frames"] for r in index),
                      seconds=round(seconds, 3), hours=round(seconds / 3600, 6), shards=len(plan), num_codebooks=k,
                      frame_rate=codec.frame_rate)
    _atomic_write_json(out / SUMMARY_FILE, summary.to_dict())
    _atomic_write_json(out / DATASET_FILE, {**base, "complete": True, "utterances": len(index), "shards": len(plan)})
    if progress:
        print(summary)
    return summary

