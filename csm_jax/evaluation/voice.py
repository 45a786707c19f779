"""Does a trained voice speak? Intelligibility, timing and voice prompting of a Generator on text it never saw.

    report = evaluate_voice(gen, corpus_dir, held_out, out_dir="eval/voice")

For each held-out sentence (`heldout.txt` of the speech corpus: sentences no training conversation says) the model
speaks it after a one-turn context: a held-out utterance of one corpus voice (its text and audio, speaker 0), so
the turn should come out in that voice. The same sentences rendered by eSpeak NG (`reference` voice) are the
yardstick: both go through the same recogniser (pocketsphinx with a language model of the corpus text and the
held-out sentences) for word error rates, and the generated durations are compared with the reference's. A turn
"ends" when the model emits its end frame before `max_audio_ms`.

The model's default voice (`default_voice`, when it ships voice presets): each sentence is also spoken with no
context but the default preset, as the server and the CLI speak it when nothing else prompts the voice; scored the
same way (`wer_default_voice`, its durations and ends).

Voice prompting: every sentence's prompt voice A is paired with another voice B of the held-out set; the output
counts as prompted when `speaker_distance` puts it closer to A's prompt utterance than to an utterance of B (F0
register and spread plus the long-term spectral envelope, scaled by the within-voice spread measured on the
held-out utterances; see `csm_jax.evaluation.speaker`). The generated audio can only be as close to a voice as the
codec renders it, so when the generator has a codec the same test is also applied to the codec's resynthesis of
another held-out utterance of A (`prompting_ceiling`): what a CSM that reproduced A's codes exactly would score.
With a codec, both tests are also run against the codec's renderings of A's prompt and of B's utterance instead of
the recordings (`prompting_accuracy_codec`, `prompting_ceiling_codec`; as VALL-E scores speaker similarity against
the codec-decoded prompt): a CSM can only speak through its codec, so this separates the voice the CSM chose
from what the codec does to every voice (the original-reference figures count both).

Reading (`reading_pairs` > 0): `csm_jax.evaluation.reading.reading_profile` on held-out turns of one voice after
that voice's earlier turn: how much worse the teacher-forced codebook-0 loss gets, through the turn, when the
turn's text is swapped for another sentence (progress long before the WER moves). Code sources (`source_pairs`
> 0): `csm_jax.evaluation.reading.code_source_wer` on such pairs: which half of the model loses the words; and
`input_reliance` on them: how far the backbone falls when the past frames' fine codebooks are the depth decoder's
(free running) instead of the true ones.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from csm_jax.audio import load_audio
from csm_jax.csm.generator import Segment
from csm_jax.csm.voices import DEFAULT_VOICE, resolve
from csm_jax.data.manifest import Utterance
from csm_jax.data.synth import Voice, synthesise
from csm_jax.evaluation.intelligibility import Intelligibility, word_error_rate
from csm_jax.evaluation.reading import code_source_wer, input_reliance, reading_profile, same_voice_pairs
from csm_jax.evaluation.speaker import feature_scale, speaker_distance, speaker_features


@dataclass(frozen=True)
class VoiceEvalConfig:
    """sentences: how many held-out sentences (the first ones of heldout.txt); reference: the eSpeak NG voice of
    the yardstick rendering; sampling settings (None: the model's, `Generator.sampling`); reading_pairs: held-out
    pairs of the reading profile (0: none); source_pairs: held-out pairs of the code-source WERs (0: none);
    default_voice: also speak every sentence with the model's default voice preset alone (when it has one)."""

    sentences: int = 60
    max_audio_ms: int = 10_000
    temperature: float | None = None  # sampling: None keeps the model's (`Generator.sampling`)
    top_k: int | None = None
    depth_temperature: float | None = None
    depth_top_k: int | None = None
    seed: int = 0
    reference: str = "en-us"
    reading_pairs: int = 24
    source_pairs: int = 12
    default_voice: bool = True


def _resynthesis(codec: Any, audio: np.ndarray) -> np.ndarray:
    """float32 speech [N] -> the codec's rendering of it (`MimiCodec.resynthesize`), float32 [N]."""
    return np.asarray(codec.resynthesize(audio[None]))[0]


def _by_voice(utterances: Sequence[Utterance]) -> dict[int, list[Utterance]]:
    groups: dict[int, list[Utterance]] = defaultdict(list)
    for u in utterances:
        groups[u.speaker].append(u)
    return {v: sorted(us, key=lambda u: (u.conversation, u.turn)) for v, us in sorted(groups.items()) if len(us) >= 2}


def evaluate_voice(gen: Any, sentences: Sequence[str], held_out: Sequence[Utterance], corpus_text: Sequence[str],
                   cfg: VoiceEvalConfig = VoiceEvalConfig(), out_dir: str | Path | None = None) -> dict[str, Any]:
    """gen: a `csm_jax.Generator`; sentences: unseen text; held_out: utterances of the held-out conversations
    (manifest `speaker` = voice id; voices with at least two of them are used); corpus_text: the training text
    (with `sentences`, the recogniser's language model). Writes wavs and `voice_eval.json` to `out_dir` if given.

    -> {"wer_generated", "wer_reference", "wer_gap", "duration_ratio_median", "duration_in_range" (fraction of
    turns within 0.5-2x of the reference), "ended" (fraction that emitted the end frame), "prompting_accuracy",
    "prompting_ceiling", "prompting_accuracy_codec", "prompting_ceiling_codec" (when `gen.codec` exists; the
    module docstring), "wer_default_voice",
    "wer_gap_default_voice", "duration_ratio_default_voice", "ended_default_voice" (with `default_voice` and a
    model that has a default preset), "pairs", "sentences", "reading"
    (`reading_profile`'s dict, with reading_pairs > 0), "code_sources"
    (`code_source_wer`'s, with source_pairs > 0), "input_reliance" (`input_reliance`'s, with source_pairs > 0),
    "items": per-sentence records}."""
    voices = _by_voice(held_out)
    if len(voices) < 2:
        raise ValueError("voice evaluation needs held-out utterances of at least two voices (two each)")
    sentences = list(sentences)[: cfg.sentences]
    asr = Intelligibility([*corpus_text, *sentences])
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    audio_of = {u.audio: load_audio(u.audio) for us in voices.values() for u in us}
    feats = {path: speaker_features(a) for path, a in audio_of.items()}
    scale = feature_scale([[feats[u.audio] for u in us] for us in voices.values()])
    ids = list(voices)
    rng = np.random.default_rng(cfg.seed)
    max_frames = cfg.max_audio_ms // 80
    generated, references, items, ceiling = [], [], [], []
    codec = getattr(gen, "codec", None)
    coded_feats: dict[Path, np.ndarray] = {}

    def coded(path: Path) -> np.ndarray:
        """Speaker features of the codec's rendering of a held-out utterance."""
        if path not in coded_feats:
            coded_feats[path] = speaker_features(_resynthesis(codec, audio_of[path]))
        return coded_feats[path]

    default_voice = cfg.default_voice and resolve(getattr(gen, "voices", {}), DEFAULT_VOICE) is not None
    by_default_voice = []
    with tempfile.TemporaryDirectory(prefix="csm-jax-voice-eval-") as tmp:
        for i, text in enumerate(sentences):
            a, b = rng.choice(len(ids), 2, replace=False)
            voice_a, voice_b = ids[a], ids[b]
            prompt = voices[voice_a][i % len(voices[voice_a])]
            other = voices[voice_b][i % len(voices[voice_b])]
            audio = gen.generate(text, 0, [Segment(0, prompt.text, audio_of[prompt.audio])], cfg.max_audio_ms,
                                 cfg.temperature, cfg.top_k, cfg.seed + i, depth_temperature=cfg.depth_temperature,
                                 depth_top_k=cfg.depth_top_k)
            ref_path = synthesise(Voice("espeak-ng", cfg.reference), text, Path(tmp) / f"ref_{i}.wav")
            reference = load_audio(ref_path)
            f_out = speaker_features(audio) if audio.size else np.full_like(feats[prompt.audio], np.nan)
            d_a = speaker_distance(f_out, feats[prompt.audio], scale)
            d_b = speaker_distance(f_out, feats[other.audio], scale)
            frames = audio.size // 1920
            items.append({"text": text, "prompt_voice": int(voice_a), "other_voice": int(voice_b),
                          "prompt": str(prompt.audio), "seconds": audio.size / 24000,
                          "reference_seconds": reference.size / 24000, "ended": frames < max_frames,
                          "distance_prompt": d_a, "distance_other": d_b, "prompted": bool(d_a < d_b)})
            if codec is not None:  # the codec's own rendering of another of A's utterances: the prompting ceiling
                same = voices[voice_a][(i + 1) % len(voices[voice_a])]
                f_res, r_a, r_b = (coded(u.audio) for u in (same, prompt, other))
                ceiling.append([speaker_distance(f_res, feats[prompt.audio], scale)
                                < speaker_distance(f_res, feats[other.audio], scale),
                                speaker_distance(f_res, r_a, scale) < speaker_distance(f_res, r_b, scale)])
                items[-1]["prompted_codec"] = bool(speaker_distance(f_out, r_a, scale)
                                                   < speaker_distance(f_out, r_b, scale))
            generated.append(audio if audio.size else np.zeros(1920, np.float32))
            if default_voice:  # no context: the default preset prompts the voice
                alone = gen.generate(text, 0, [], cfg.max_audio_ms, cfg.temperature, cfg.top_k, cfg.seed + i,
                                     depth_temperature=cfg.depth_temperature, depth_top_k=cfg.depth_top_k)
                items[-1] |= {"default_voice_seconds": alone.size / 24000,
                              "default_voice_ended": alone.size // 1920 < max_frames}
                by_default_voice.append(alone if alone.size else np.zeros(1920, np.float32))
            references.append(reference)
            if out is not None:
                sf.write(out / f"sample_{i:03d}.wav", generated[-1], 24000)
    for item, audio, ref in zip(items, generated, references):
        item["transcript"], item["reference_transcript"] = asr.transcribe(audio), asr.transcribe(ref)
    for item, audio in zip(items, by_default_voice):
        item["default_voice_transcript"] = asr.transcribe(audio)
    ratios = np.array([it["seconds"] / it["reference_seconds"] for it in items])
    result = {"wer_generated": word_error_rate(sentences, [it["transcript"] for it in items]),
              "wer_reference": word_error_rate(sentences, [it["reference_transcript"] for it in items]),
              "duration_ratio_median": float(np.median(ratios)),
              "duration_in_range": float(np.mean((ratios >= 0.5) & (ratios <= 2.0))),
              "ended": float(np.mean([it["ended"] for it in items])),
              "prompting_accuracy": float(np.mean([it["prompted"] for it in items])),
              "pairs": len(items), "sentences": len(sentences), "voices": len(ids), "config": asdict(cfg),
              "sampling": asdict(gen.resolve_sampling(cfg.temperature, cfg.top_k, cfg.depth_temperature,
                                                      cfg.depth_top_k))}
    result["wer_gap"] = result["wer_generated"] - result["wer_reference"]
    if by_default_voice:
        alone = np.array([it["default_voice_seconds"] / it["reference_seconds"] for it in items])
        result |= {"wer_default_voice": word_error_rate(sentences, [it["default_voice_transcript"] for it in items]),
                   "duration_ratio_default_voice": float(np.median(alone)),
                   "ended_default_voice": float(np.mean([it["default_voice_ended"] for it in items]))}
        result["wer_gap_default_voice"] = result["wer_default_voice"] - result["wer_reference"]
    if ceiling:
        result["prompting_ceiling"], result["prompting_ceiling_codec"] = np.mean(ceiling, axis=0).tolist()
        result["prompting_accuracy_codec"] = float(np.mean([it["prompted_codec"] for it in items]))
    if cfg.reading_pairs > 0:
        result["reading"] = reading_profile(gen, same_voice_pairs(held_out, cfg.reading_pairs),
                                            [u.text for u in held_out], seed=cfg.seed)
    if cfg.source_pairs > 0:
        pairs = same_voice_pairs(held_out, cfg.source_pairs)
        result["code_sources"] = code_source_wer(gen, pairs, Intelligibility([*corpus_text, *sentences,
                                                                               *(t.text for _, t in pairs)]))
        result["input_reliance"] = input_reliance(gen, pairs)
    if out is not None:
        (out / "voice_eval.json").write_text(json.dumps(result | {"items": items}, indent=2, default=str))
    return result | {"items": items}
