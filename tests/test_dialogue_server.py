"""The voice-conversation loop on the real server: user audio turns are transcribed (the server's default
pocketsphinx), stored with their text, and prompt the next response as text rows plus audio rows; talk mode (voice
activity ends the user's turns, a scripted OpenAI-compatible chat server writes the replies, spoken sentence by
sentence, barge-in) and its faults."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
from chat_server import ChatServer, Piece
from serve_fixtures import Client, LiveServer, run, start_server_process
from speech_data import TEXTS

from csm_jax.conversation import ConversationManager, SQLiteStore
from csm_jax.default_model import random_generator
from csm_jax.evaluation.intelligibility import word_error_rate

DATA = Path(__file__).parent / "data"


def test_a_spoken_turn_is_transcribed_stored_and_prompts_the_reply(live_server: LiveServer) -> None:
    audio, rate = sf.read(DATA / "speech_14s.wav", dtype="int16")

    async def go() -> tuple[Any, ...]:
        c = await Client.open(live_server.ws_url)
        cid = (await c.start())["conversation_id"]
        stored = await c.send_audio(audio.astype("<i2").tobytes(), chunk=9600, speaker=1, sample_rate=rate,
                                    encoding="pcm16")
        started, _, _ = await c.say("Nice story.", speaker=0, max_audio_ms=160, seed=2)
        history = await c.request({"type": "history"})
        await c.close()
        return cid, stored, started, history

    cid, stored, started, history = run(go())
    assert stored["type"] == "turn.stored" and stored["transcribed"] is True, stored
    transcript = stored["turn"]["text"]
    wer = word_error_rate([TEXTS["speech_14s.wav"]], [transcript])
    print(f"server transcript WER {wer:.2f}: {transcript!r}")
    assert wer <= 0.7, transcript  # pocketsphinx's general model on espeak speech (tests/test_transcriber.py)
    assert history["turns"][0]["text"] == transcript and history["turns"][0]["source"] == "user"

    # the reply's prompt is the library's: the transcript's text rows, the turn's audio rows, then the target text
    store = SQLiteStore(str(live_server.db_path))
    try:
        turn = store.turns(cid)[0]
        gen = random_generator(0)
        manager = ConversationManager(store, gen.prompt_format(), gen.cfg.backbone.max_seq_len)
        fmt = gen.prompt_format()
        tokens, mask = fmt.turn_rows(fmt.text_ids(transcript, 1), turn.codes)
        text_only = fmt.turn_rows(None, turn.codes)[0]
        target = fmt.text_rows("Nice story.", 0)[0]
        prompt = manager.build_prompt(cid, "Later.", 0, 2)  # now with the reply too: the spoken turn comes first
    finally:
        store.close()
    assert started["context_turns"] == 1 and started["prompt_rows"] == len(tokens) + len(target)
    assert len(tokens) > len(text_only) and mask[:, -1].any() and mask[:, :-1].any()  # text rows and audio rows
    np.testing.assert_array_equal(prompt.tokens[: len(tokens)], tokens)


# ------------------------------------------------------------------------------------------------ talk mode ---
class Talker:
    """A talk-mode client: streams a microphone (speech clips between silence, 4x faster than real time) and
    records every event and binary frame with its arrival order."""

    CHUNK = 1920  # 80 ms at 24 kHz

    def __init__(self, client: Client):
        self.c = client
        self.log: list[Any] = []  # dict events and bytes frames, in arrival order
        self.speech: list[np.ndarray] = []
        self.arrived = asyncio.Event()

    async def read(self) -> None:
        async for message in self.c.ws:
            self.log.append(message if isinstance(message, bytes) else json.loads(message))
            self.arrived.set()

    async def mic(self) -> None:
        silence = np.zeros(self.CHUNK, "<i2")
        while True:
            audio = self.speech.pop(0) if self.speech else silence
            for i in range(0, len(audio), self.CHUNK):
                await self.c.ws.send(audio[i:i + self.CHUNK].tobytes())
                await asyncio.sleep(0.02)

    async def wait(self, predicate: Any, timeout: float = 300) -> Any:
        """The first logged item (in order) satisfying `predicate`, waiting for it."""
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for item in self.log[seen:]:
                    if predicate(item):
                        return item
                seen = len(self.log)
                self.arrived.clear()
                await self.arrived.wait()

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.log if isinstance(e, dict) and e.get("type") == kind]


def is_event(kind: str, **fields: Any) -> Any:
    return lambda e: isinstance(e, dict) and e.get("type") == kind and all(e.get(k) == v for k, v in fields.items())


def speech_24k() -> np.ndarray:
    audio, rate = sf.read(DATA / "speech_3s.wav", dtype="float32")
    return (soxr.resample(audio, rate, 24_000) * 32767).astype("<i2")


def test_talk_mode_answers_a_spoken_question_sentence_by_sentence(talk_server: LiveServer, chat: ChatServer
                                                                  ) -> None:
    gate = threading.Event()
    chat.script = [[Piece("Nice to hear you. "), Piece("Tell me more ", gate), Piece("about it.")]]

    async def go() -> tuple[Talker, list[Any]]:
        t = Talker(await Client.open(talk_server.ws_url))
        cid = (await t.c.start())["conversation_id"]
        reader = asyncio.create_task(t.read())
        await t.c.send({"type": "talk.start", "speaker": 1, "reply_speaker": 0, "sample_rate": 24_000,
                        "max_audio_ms": 480, "seed": 4})
        await t.wait(is_event("talk.started"))
        mic = asyncio.create_task(t.mic())
        t.speech.append(speech_24k())
        first = await t.wait(lambda e: isinstance(e, bytes))  # the first sentence is heard ...
        early = [e.get("text") for e in t.events("reply.delta")]  # ... before the rest of the reply exists
        gate.set()
        await t.wait(is_event("reply.done"))
        await t.c.send({"type": "talk.stop"})
        await t.wait(is_event("talk.stopped"))
        mic.cancel()
        await t.c.send({"type": "history"})
        history = await t.wait(is_event("history"))
        reader.cancel()
        await t.c.close()
        return t, [cid, first, early, history]

    t, (_cid, _, early, history) = run(go())
    assert early == ["Nice to hear you. "], early
    kinds = [e["type"] if isinstance(e, dict) else "frame" for e in t.log]
    order = [k for k in kinds if k != "frame"]
    assert order.index("speech.started") < order.index("speech.stopped") < order.index("turn.stored") \
        < order.index("reply.started") < order.index("response.started")
    stored = t.events("turn.stored")[0]
    assert stored["transcribed"] and stored["turn"]["source"] == "user" and stored["turn"]["speaker"] == 1
    done = t.events("reply.done")[0]
    assert done["text"] == "Nice to hear you. Tell me more about it." and not done["interrupted"]
    spoken = t.events("response.done")
    assert [d["reply_id"] for d in spoken] == [done["reply_id"]] * 2 and all(d["frames"] > 0 for d in spoken)
    assert kinds.count("frame") == sum(d["frames"] for d in spoken)
    turns = history["turns"]
    assert [(x["source"], x["text"]) for x in turns] == [
        ("user", stored["turn"]["text"]), ("generated", "Nice to hear you."), ("generated", "Tell me more about it.")]
    # the responder saw the conversation: the transcript as the user's message
    assert chat.requests[-1]["messages"][-1] == {"role": "user", "content": stored["turn"]["text"]}
    assert chat.requests[-1]["stream"] is True


def test_barge_in_stops_the_reply_within_two_frames_and_keeps_what_was_sent(talk_server: LiveServer,
                                                                            chat: ChatServer) -> None:
    chat.script = [[Piece("This is a long answer that goes on and on. "), Piece("And on.")], [Piece("Sure.")]]

    async def go() -> Talker:
        t = Talker(await Client.open(talk_server.ws_url))
        await t.c.start()
        reader = asyncio.create_task(t.read())
        await t.c.send({"type": "talk.start", "speaker": 1, "reply_speaker": 0, "sample_rate": 24_000,
                        "max_audio_ms": 20_000, "seed": 5})
        await t.wait(is_event("talk.started"))
        mic = asyncio.create_task(t.mic())
        t.speech.append(speech_24k())
        await t.wait(lambda e: isinstance(e, bytes))  # the long reply is playing: interrupt it
        t.speech.append(speech_24k())
        await t.wait(is_event("response.done", stop_reason="interrupted"))
        await t.wait(is_event("reply.done", interrupted=False))  # the answer to the interruption
        mic.cancel()
        await t.c.send({"type": "history"})
        await t.wait(is_event("history"))
        reader.cancel()
        await t.c.close()
        return t

    t = run(go())
    cut = t.events("response.done")[0]
    assert cut["stop_reason"] == "interrupted" and cut["turn_id"] is not None
    second_start = [i for i, e in enumerate(t.log) if isinstance(e, dict) and e.get("type") == "speech.started"][1]
    done_at = t.log.index(cut)
    after = sum(isinstance(e, bytes) for e in t.log[second_start:done_at])
    assert after <= 2, after  # cancelled within 2 frames of the detected speech
    sent = sum(isinstance(e, bytes) for e in t.log[:done_at])
    assert cut["frames"] == sent < 250  # 20 s would be 250 frames
    first_reply = t.events("reply.done")[0]
    assert first_reply["interrupted"] is True
    turns = t.events("history")[0]["turns"]
    kept = next(x for x in turns if x["turn_id"] == cut["turn_id"])
    assert kept["frames"] == sent and kept["source"] == "generated"
    assert [x["source"] for x in turns] == ["user", "generated", "user", "generated"]


def test_talk_mode_faults_give_clear_errors_and_keep_the_user_turn(talk_server: LiveServer, chat: ChatServer
                                                                   ) -> None:
    async def one_turn(t: Talker) -> dict[str, Any]:
        t.speech.append(speech_24k())
        done = await t.wait(lambda e: is_event("reply.done")(e) and e not in seen)
        seen.append(done)
        return done

    seen: list[Any] = []

    async def go() -> Talker:
        t = Talker(await Client.open(talk_server.ws_url))
        await t.c.start()
        reader = asyncio.create_task(t.read())
        await t.c.send({"type": "talk.stop"})
        await t.wait(is_event("error", code="not_talking"))
        await t.c.send({"type": "talk.start", "speaker": 1, "sample_rate": 24_000, "voice": "nobody"})
        await t.wait(is_event("error", code="bad_field"))  # the replies' voice preset: the model has none
        await t.c.send({"type": "talk.start", "speaker": 1, "sample_rate": 24_000, "max_audio_ms": 160})
        await t.wait(is_event("talk.started"))
        mic = asyncio.create_task(t.mic())
        await t.c.send({"type": "say", "text": "Typed.", "speaker": 0})
        await t.wait(lambda e: is_event("error", code="busy")(e))
        await t.c.ws.send(b"\x00")  # half a sample: dropped, talk mode goes on
        await t.wait(lambda e: is_event("error", code="bad_audio")(e))
        noise = np.random.default_rng(0).normal(0, 0.03 * 32767, 48_000).astype("<i2")  # 2 s at -30 dBFS
        t.speech.append(noise)
        chat.status = 500
        await one_turn(t)
        await t.wait(lambda e: is_event("error", code="responder_error")(e))
        chat.status = 0  # hangs up: as if unreachable
        await one_turn(t)
        await t.wait(lambda e: is_event("error", code="responder_unreachable")(e))
        chat.status = -1
        await one_turn(t)
        await t.wait(lambda e: is_event("error", code="responder_bad_stream")(e))
        chat.status = 200
        late = threading.Event()
        chat.script = [[Piece("Too late.", late)]]  # no text within first_token_timeout_s=5
        await one_turn(t)
        await t.wait(lambda e: is_event("error", code="responder_timeout")(e))
        late.set()
        chat.script = [[Piece("Fine.")]]
        await one_turn(t)
        mic.cancel()
        await t.c.send({"type": "history"})
        await t.wait(is_event("history"))
        reader.cancel()
        await t.c.close()
        return t

    try:
        t = run(go())
    finally:
        chat.status = 200
    assert t.events("error")[0]["code"] == "not_talking"
    error = next(e for e in t.events("error") if e["code"] == "responder_error")
    assert "500" in error["message"] and "Traceback" not in error["message"]
    turns = t.events("history")[0]["turns"]
    assert [x["source"] for x in turns] == ["user"] * 5 + ["generated"]  # failed replies kept their user turns
    assert [d["text"] for d in t.events("reply.done")] == ["", "", "", "", "Fine."]
    assert len(t.events("speech.started")) == 5  # the noise was not taken for speech


def test_a_recogniser_failure_keeps_the_turn_without_text(tmp_path: Path, xla_cache: Path) -> None:
    """A transformers recogniser that fails on every real input (a random wav2vec2 whose convolution window is longer
    than any turn here): `transcription_failed`, and the turn is stored, as audio only."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    model = tmp_path / "asr"
    model.mkdir()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "a": 5}
    (model / "vocab.json").write_text(json.dumps(vocab))
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, conv_dim=(4,), conv_stride=(5,), conv_kernel=(80_000,),
                            num_feat_extract_layers=1, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                            pad_token_id=0)
    Wav2Vec2ForCTC(config).save_pretrained(model)
    Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000),
                      tokenizer=Wav2Vec2CTCTokenizer(str(model / "vocab.json"))).save_pretrained(model)
    server = start_server_process(tmp_path, xla_cache, "transcriber.backend=transformers",
                                  f"transcriber.model={model}")
    audio = speech_24k()

    async def go() -> tuple[Any, ...]:
        c = await Client.open(server.ws_url)
        await c.start()
        await c.send({"type": "audio.start", "speaker": 1, "sample_rate": 24_000})
        assert (await c.event())["type"] == "audio.started"
        await c.send(audio.tobytes())
        await c.send({"type": "audio.end"})
        failed, stored = await c.event(), await c.event()
        history = await c.request({"type": "history"})
        await c.close()
        return failed, stored, history

    try:
        failed, stored, history = run(go())
    finally:
        server.stop()
    assert failed["type"] == "error" and failed["code"] == "transcription_failed", failed
    assert "recognition failed" in failed["message"] and "Traceback" not in failed["message"]
    assert stored["type"] == "turn.stored" and stored["transcribed"] is False and stored["turn"]["text"] == ""
    assert [t["frames"] for t in history["turns"]] == [stored["frames"]]
