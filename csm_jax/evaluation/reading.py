"""Does a CSM read its text? Teacher-forced codebook-0 loss of real turns with their own text and with another
sentence's text, through the turn.

    profile = reading_profile(gen, pairs, other_texts)   # pairs: (voice prompt, target) utterances of one voice
    profile["gap"]       # per part of the turn: NLL(other text) - NLL(own text), nats per frame

While a small TTS model is far from intelligible its WER stays near 1.0 and says nothing about progress; this does.
A model that ignores the text content (it may still use the text's length) has a gap of ~0 everywhere; one that
reads only the start of a turn and then loses its place has a gap in the first part only; a model that reads has a
gap all through. The rows are the conversation format's (`Generator.prompt_format()`): the prompt turn's text and
audio, then the target's text and audio (its end frame included), codes from the model's own codec.

    code_source_wer(gen, pairs, asr)["wer"]   # resynthesis WER with codebook 0 and codebooks 1..K-1 each true or
                                              # the model's (teacher-forced): which half loses the words
    input_reliance(gen, pairs)                # teacher-forced codebook-0 accuracy when the past frames' fine
                                              # codebooks are the depth decoder's or absent: exposure to its errors
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from csm_jax.audio import load_audio
from csm_jax.csm.model import Csm, spoken_mask
from csm_jax.csm.prompt import Rows, concat
from csm_jax.data.manifest import Utterance


def same_voice_pairs(utterances: Sequence[Utterance], limit: int | None = None) -> list[tuple[Utterance, Utterance]]:
    """(prompt, target) pairs: in each conversation (sorted by name), the first turn whose voice (manifest
    `speaker`) spoke earlier, with that voice's latest earlier turn as the prompt. At most `limit` pairs."""
    by_conv: dict[str, list[Utterance]] = {}
    for u in utterances:
        by_conv.setdefault(u.conversation, []).append(u)
    pairs = []
    for name in sorted(by_conv):
        turns = sorted(by_conv[name], key=lambda u: u.turn)
        for i, target in enumerate(turns):
            earlier = [u for u in turns[:i] if u.speaker == target.speaker]
            if earlier:
                pairs.append((earlier[-1], target))
                break
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def _turn_nll(logits: np.ndarray, tokens: np.ndarray, frames: int) -> np.ndarray:
    """c0 logits float [S, V] of a sequence whose last `frames` rows are the target's audio -> NLL float64
    [frames - 1] of its audio frames (the end frame excluded), each predicted from the row before it."""
    s = tokens.shape[0]
    start = s - frames
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[start - 1: s - 2], jnp.float32), axis=-1), np.float64)
    return -lp[np.arange(frames - 1), tokens[start: s - 1, 0]]


def reading_profile(gen: Any, pairs: Sequence[tuple[Utterance, Utterance]], other_texts: Sequence[str],
                    parts: int = 4, seed: int = 0) -> dict[str, Any]:
    """gen: a `csm_jax.Generator` with its codec; pairs: (prompt, target) utterances of one voice (the prompt is
    spoken as speaker 0, then the target as speaker 0); other_texts: sentences to swap in for the target's text (a
    seeded draw per pair, never the target's own) -> {"nll_own", "nll_other", "gap": float lists [parts] (nats
    per frame, the mean over pairs of each part's mean), "nll_own_mean", "nll_other_mean", "pairs"}."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    fmt = gen.prompt_format()
    model = Csm(gen.cfg)
    forward = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method=Csm.backbone_forward)[0])
    rng = np.random.default_rng(seed)
    own_parts, other_parts, own_all, other_all = [], [], [], []
    for prompt, target in pairs:
        candidates = [t for t in other_texts if t != target.text]
        if not candidates:
            raise ValueError("other_texts has no sentence other than the target's")
        other = candidates[int(rng.integers(len(candidates)))]
        context = [fmt.text_rows(prompt.text, 0), gen.audio_rows(load_audio(prompt.audio))]
        audio = gen.audio_rows(load_audio(target.audio))
        frames = len(audio[0])
        if frames < parts + 1:
            continue  # too short to cut into parts
        result = []
        for text in (target.text, other):
            tokens, mask = _teacher_forced(gen, [*context, fmt.text_rows(text, 0)], audio)
            logits = np.asarray(forward(gen.params, jnp.asarray(tokens[None]), jnp.asarray(mask[None])))[0]
            result.append(_turn_nll(logits, tokens, frames))
        own_parts.append([p.mean() for p in np.array_split(result[0], parts)])
        other_parts.append([p.mean() for p in np.array_split(result[1], parts)])
        own_all.append(result[0].mean())
        other_all.append(result[1].mean())
    if not own_parts:
        raise ValueError("no pair has a target long enough to cut into parts")
    own, oth = np.mean(own_parts, axis=0), np.mean(other_parts, axis=0)
    return {"nll_own": own.tolist(), "nll_other": oth.tolist(), "gap": (oth - own).tolist(),
            "nll_own_mean": float(np.mean(own_all)), "nll_other_mean": float(np.mean(other_all)),
            "pairs": len(own_parts)}


def _teacher_forced(gen: Any, parts: Sequence[Rows], audio: Rows) -> Rows:
    """Context rows `parts`, then the target turn's audio rows `audio` read as spoken (`spoken_mask`), as the
    training loss reads a target turn -> tokens int32 [S, K+1], mask bool [S, K+1]."""
    tokens, mask = concat([*parts, audio])
    spoken = np.arange(len(mask)) >= len(mask) - len(audio[1])
    return tokens, np.asarray(spoken_mask(jnp.asarray(mask), jnp.asarray(spoken), gen.cfg))


SOURCES = ("original", "c0_true+depth", "c0_model+acoustic_true", "c0_model+depth")


def _argmax(logits: jax.Array, limit: int) -> jax.Array:
    """Greedy code among the codec's entries (the audio vocabulary may be larger than a codebook)."""
    return jnp.argmax(logits[..., :limit], axis=-1).astype(jnp.int32)


def _greedy_depth(gen: Any, forward_depth: Any, hidden: jax.Array, prefix: jax.Array) -> np.ndarray:
    """Backbone hidden float [T, D] (the rows before each frame), the first codebooks int [T] or [T, m] -> codes
    int [T, K]: those, then the depth decoder's greedy codebooks m..K-1, each given the ones before it."""
    k, limit = gen.cfg.num_codebooks, gen.codec.config.codebook_size
    prefix = prefix.reshape(prefix.shape[0], -1)
    codes = jnp.zeros((prefix.shape[0], k), jnp.int32).at[:, : prefix.shape[1]].set(prefix)
    for i in range(prefix.shape[1], k):
        codes = codes.at[:, i].set(_argmax(forward_depth(gen.params, hidden, codes)[:, i - 1], limit))
    return np.asarray(codes)


def code_source_wer(gen: Any, pairs: Sequence[tuple[Utterance, Utterance]], asr: Any) -> dict[str, Any]:
    """Which half of the CSM loses the words? Each pair's target turn, teacher-forced after the prompt turn and its
    own text, resynthesised by the model's codec from codes of four sources, and scored by `asr` (an
    `Intelligibility`) against its text -> {"wer": {source: WER}, "pairs": n}. Sources: "original" (the codec's own
    codes: the ceiling), "c0_true+depth" (true codebook 0, the depth decoder's greedy codebooks 1..K-1),
    "c0_model+acoustic_true" (the backbone's argmax codebook 0, true codebooks 1..K-1), "c0_model+depth" (both
    from the model, teacher-forced on the true history)."""
    from csm_jax.evaluation.intelligibility import word_error_rate

    fmt = gen.prompt_format()
    model = Csm(gen.cfg)
    k = gen.cfg.num_codebooks
    backbone = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method=Csm.backbone_forward))
    depth = jax.jit(lambda p, h, c: model.apply({"params": p}, h, c, method=Csm.depth_forward))
    texts: list[str] = []
    heard: dict[str, list[str]] = {s: [] for s in SOURCES}
    for prompt, target in pairs:
        audio = gen.audio_rows(load_audio(target.audio))
        frames = len(audio[0]) - 1  # the end frame is not decoded
        tokens, mask = _teacher_forced(gen, [fmt.text_rows(prompt.text, 0), gen.audio_rows(load_audio(prompt.audio)),
                                             fmt.text_rows(target.text, 0)], audio)
        logits, hidden = backbone(gen.params, jnp.asarray(tokens[None]), jnp.asarray(mask[None]))
        start = len(tokens) - frames - 1  # the target's first audio row
        before = slice(start - 1, start - 1 + frames)  # the rows that predict its frames
        true = tokens[start: start + frames, :k]
        c0_model = _argmax(logits[0, before], gen.codec.config.codebook_size)
        codes = {"original": true,
                 "c0_true+depth": _greedy_depth(gen, depth, hidden[0, before], jnp.asarray(true[:, 0])),
                 "c0_model+acoustic_true": np.concatenate([np.asarray(c0_model)[:, None], true[:, 1:]], axis=1),
                 "c0_model+depth": _greedy_depth(gen, depth, hidden[0, before], c0_model)}
        for source, c in codes.items():
            heard[source].append(asr.transcribe(np.asarray(gen.codec.decode(np.asarray(c, np.int32).T[None]))[0]))
        texts.append(target.text)
    if not texts:
        raise ValueError("no pairs to score")
    return {"wer": {s: word_error_rate(texts, heard[s]) for s in SOURCES}, "pairs": len(texts)}


def input_reliance(gen: Any, pairs: Sequence[tuple[Utterance, Utterance]], levels: Sequence[int] = (1, 2, 4)
                   ) -> dict[str, Any]:
    """How much does the backbone lean on the fine codebooks of the frames before? Each pair's target turn,
    teacher-forced after the prompt turn and its own text, scored by the backbone's codebook 0 over the turn's
    frames (its end frame excluded): argmax accuracy and NLL (nats per frame) when the target's audio rows are the
    true codes ("true"); when their codebooks m..K-1 are the depth decoder's greedy codes given the true codebooks
    0..m-1 ("depth": what free running feeds back once the depth decoder errs); when those codebooks are masked out
    ("masked").

    -> {"accuracy": {"true": float, "depth": {m: float}, "masked": {m: float}}, "nll": (the same), "pairs": int}
    for m in `levels` (1..K-1). A model whose "depth" scores are far below "true" drifts when it runs free, however
    well it scores teacher-forced."""
    k = gen.cfg.num_codebooks
    levels = [int(m) for m in levels]
    if not levels or any(not 1 <= m < k for m in levels):
        raise ValueError(f"levels must be codebook counts in 1..{k - 1}, got {levels}")
    fmt = gen.prompt_format()
    model = Csm(gen.cfg)
    limit = gen.codec.config.codebook_size
    backbone = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method=Csm.backbone_forward))
    depth = jax.jit(lambda p, h, c: model.apply({"params": p}, h, c, method=Csm.depth_forward))
    scores: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for prompt, target in pairs:
        audio = gen.audio_rows(load_audio(target.audio))
        frames = len(audio[0]) - 1  # the end frame is not scored
        tokens, mask = _teacher_forced(gen, [fmt.text_rows(prompt.text, 0), gen.audio_rows(load_audio(prompt.audio)),
                                             fmt.text_rows(target.text, 0)], audio)
        start = len(tokens) - frames - 1  # the target's first audio row
        rows, before = slice(start, start + frames), slice(start - 1, start - 1 + frames)
        true = tokens[rows, 0]

        def score(t: np.ndarray, m: np.ndarray, before: slice = before, true: np.ndarray = true
                  ) -> tuple[tuple[float, float], jax.Array]:
            """(c0 argmax accuracy, mean c0 NLL) of rows (t, m), and the backbone hidden before each frame."""
            logits, hidden = backbone(gen.params, jnp.asarray(t[None]), jnp.asarray(m[None]))
            lp = jax.nn.log_softmax(logits[0, before].astype(jnp.float32), axis=-1)
            nll = -float(jnp.mean(jnp.take_along_axis(lp, jnp.asarray(true)[:, None], axis=-1)))
            return (float(np.mean(np.asarray(_argmax(logits[0, before], limit)) == true)), nll), hidden[0, before]

        plain, hidden = score(tokens, mask)
        scores.setdefault(("true", 0), []).append(plain)
        for m in levels:
            fed = tokens.copy()
            fed[rows, :k] = _greedy_depth(gen, depth, hidden, jnp.asarray(tokens[rows, :m]))
            scores.setdefault(("depth", m), []).append(score(fed, mask)[0])
            masked = mask.copy()
            masked[rows, m:k] = False
            scores.setdefault(("masked", m), []).append(score(tokens, masked)[0])
    if not scores:
        raise ValueError("no pairs to score")
    out: dict[str, Any] = {"pairs": len(scores[("true", 0)])}
    for i, name in enumerate(("accuracy", "nll")):
        mean = {key: float(np.mean([v[i] for v in values])) for key, values in scores.items()}
        out[name] = {"true": mean[("true", 0)], "depth": {m: mean[("depth", m)] for m in levels},
                     "masked": {m: mean[("masked", m)] for m in levels}}
    return out
