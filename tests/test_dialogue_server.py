"""The voice-conversation loop on the real server: user audio turns are transcribed (the server's default
pocketsphinx), stored with their text, and prompt the next response as text rows plus audio rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from serve_fixtures import Client, LiveServer, run
from speech_data import TEXTS

from csm_jax.conversation import ConversationManager, SQLiteStore
from csm_jax.default_model import default_generator
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
        gen = default_generator(0)
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
