"""CSM generation against transformers' own `CsmForConditionalGeneration.generate`, and the Generator API.

Shapes (see csm_gen_fixtures): `tiny` (K=4, with codec and tokenizer) and `rope` (K=8, short-range llama3 RoPE).
Greedy decoding is `top_k=1` on our side and `do_sample=False, depth_decoder_do_sample=False` on transformers'.
transformers stops when codebooks 0..K-2 of a frame are all zero and keeps that frame; the original (and
csm_jax) stops only at the all-K-zero frame and drops it — the compared prompts avoid both within the compared
frames, and `test_eos_*` checks the two rules where they differ.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
from csm_gen_fixtures import (
    AUDIO_EOS_TOKEN_ID,
    AUDIO_TOKEN_ID,
    FRAME,
    VOCAB,
    GenCase,
    char_ids,
    embed_prompt,
    get_case,
    get_original_dir,
    hf_greedy,
    hf_greedy_embeds,
    jax_config,
    make_prompt,
    no_tokenizer_generator,
    sine,
)
from transformers import CsmForConditionalGeneration

import csm_jax
from csm_jax.checkpoint import CheckpointError
from csm_jax.csm import Generator, load_csm_params
from csm_jax.csm.model import Csm

N_FRAMES = 10  # frames compared against transformers
PROMPT = (("text", 6), ("audio", 5), ("eos", 1), ("text", 4))  # context turn with audio, then the target text


@pytest.fixture(scope="module", params=("tiny", "rope"))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GenCase:
    return get_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> GenCase:
    return get_case("tiny", tmp_path_factory)


def greedy(gen: Generator, tokens: np.ndarray, mask: np.ndarray, n: int = N_FRAMES) -> np.ndarray:
    return gen.generate_codes(tokens, mask, n, top_k=1)


def assert_no_eos(codes: np.ndarray) -> None:
    """Neither transformers' EOS (codebooks 0..K-2 zero) nor the original's (all K zero) occurs."""
    assert not (codes[:, :-1] == 0).all(-1).any(), codes


def audio_rows(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated frames [T, K] as prompt rows (mask on the K audio columns)."""
    tokens = np.zeros((len(codes), k + 1), np.int32)
    tokens[:, :k] = codes
    mask = np.zeros_like(tokens, bool)
    mask[:, :k] = True
    return tokens, mask


# --------------------------------------------------------------------------- 1. greedy vs transformers ---
def test_greedy_matches_transformers_generate(case: GenCase) -> None:
    """Our exact K+1-column prompt (text rows, audio rows, the all-zero frame, text rows) is fed to transformers
    as `inputs_embeds` (the masked column sum); both sides decode greedily for N_FRAMES frames."""
    tokens, mask = make_prompt(case.model.config, PROMPT, seed=0)
    ref = hf_greedy_embeds(case.model, tokens, mask, N_FRAMES)
    assert ref.shape == (N_FRAMES, case.k)
    assert_no_eos(ref)
    assert len({tuple(r) for r in ref}) >= 5  # not stuck on one frame
    codes = greedy(case.gen, tokens, mask)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.int32 and codes.shape == (N_FRAMES, case.k)
    np.testing.assert_array_equal(codes, ref)
    # top_k=1 is greedy whatever the temperature and seed
    np.testing.assert_array_equal(case.gen.generate_codes(tokens, mask, N_FRAMES, temperature=3.0, top_k=1,
                                                          seed=123), ref)


def test_greedy_matches_transformers_text_input_ids(case: GenCase) -> None:
    """A text-only prompt through transformers' own embedding path (`input_ids` [1, S])."""
    k = case.k
    ids = np.random.default_rng(5).integers(5, case.model.config.text_vocab_size, 9)
    ref = hf_greedy(case.model, N_FRAMES, input_ids=torch.from_numpy(ids[None]))
    assert ref.shape == (N_FRAMES, k)
    assert_no_eos(ref)
    tokens = np.zeros((len(ids), k + 1), np.int32)
    tokens[:, k] = ids
    mask = np.zeros_like(tokens, bool)
    mask[:, k] = True
    np.testing.assert_array_equal(greedy(case.gen, tokens, mask), ref)


def test_greedy_with_audio_context_matches_transformers(tiny: GenCase) -> None:
    """End to end through both front ends: transformers encodes the context audio with its codec inside
    `generate(input_ids with <|AUDIO|>... <|audio_eos|>, input_values, input_values_cutoffs)`; csm_jax builds
    the prompt with `Generator.prompt(text, speaker, [Segment(...)])` (our tokenizer, our Mimi)."""
    model, gen, k = tiny.model, tiny.gen, tiny.k
    audio = sine(3, seed=1)
    with torch.no_grad():
        hf_codes = model.codec_model.encode(torch.from_numpy(audio)[None, None]).audio_codes[0].numpy()  # [K, T]
    assert hf_codes.shape == (k, 3) and len(np.unique(hf_codes)) > 3
    np.testing.assert_array_equal(np.asarray(gen.codec.encode(audio[None]))[0], hf_codes)  # same codec codes

    ctx, target = "[1]hi there.", "[0]how are you?"
    input_ids = ([VOCAB["<|begin_of_text|>"], *char_ids(ctx), VOCAB["<|end_of_text|>"]]
                 + [AUDIO_TOKEN_ID] * 3 + [AUDIO_EOS_TOKEN_ID]
                 + [VOCAB["<|begin_of_text|>"], *char_ids(target), VOCAB["<|end_of_text|>"]])
    ref = hf_greedy(model, N_FRAMES, input_ids=torch.tensor([input_ids]),
                    input_values=torch.from_numpy(audio)[None, None],
                    input_values_cutoffs=torch.tensor([[len(audio)]]))
    assert ref.shape == (N_FRAMES, k)
    assert_no_eos(ref)

    tokens, mask = gen.prompt("how are you?", 0, [csm_jax.Segment(1, "hi there.", audio)])
    assert len(tokens) == len(input_ids)
    np.testing.assert_array_equal(greedy(gen, tokens, mask), ref)


# ------------------------------------------------------------------------------ 2. original format ---
def test_original_format_checkpoint(case: GenCase, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same weights under the original Sesame names (q/k rows interleaved), loaded with an explicit tiny
    CsmConfig, give the same parameters and the same greedy codes as the transformers-format load."""
    orig_dir = get_original_dir(case.shape, tmp_path_factory)
    cfg = jax_config(case.model)
    assert cfg == case.gen.cfg  # CsmConfig.from_hf reads the transformers config.json the same way
    params, got_cfg = load_csm_params(orig_dir, config=cfg)
    assert got_cfg == cfg
    flat_ours = jax.tree_util.tree_leaves_with_path(params)
    flat_hf = dict(jax.tree_util.tree_leaves_with_path(case.gen.params))
    assert len(flat_ours) == len(flat_hf)
    for path, leaf in flat_ours:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_hf[path]), err_msg=jax.tree_util.keystr(path))

    gen = Generator(params, cfg)
    tokens, mask = make_prompt(case.model.config, PROMPT, seed=0)
    ref = hf_greedy_embeds(case.model, tokens, mask, N_FRAMES)
    np.testing.assert_array_equal(greedy(gen, tokens, mask), ref)
    np.testing.assert_array_equal(greedy(case.gen, tokens, mask), ref)

    # the original config.json only names full-size flavours: loading it as-is must fail loudly, not silently
    with pytest.raises(CheckpointError):
        csm_jax.load_csm(orig_dir)


# ---------------------------------------------------------------------------- 3. batching and seeds ---
def _batch(prompts: list[tuple[np.ndarray, np.ndarray]], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts to one [B, S, K+1] batch; padding rows hold random in-range ids, all masked out."""
    s = max(len(t) for t, _ in prompts)
    k1 = prompts[0][0].shape[1]
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 10, (len(prompts), s, k1)).astype(np.int32)
    mask = np.zeros((len(prompts), s, k1), bool)
    for i, (t, m) in enumerate(prompts):
        tokens[i, : len(t)], mask[i, : len(m)] = t, m
    return tokens, mask


def test_batched_equals_one_by_one(tiny: GenCase) -> None:
    cfg, gen = tiny.model.config, tiny.gen
    prompts = [make_prompt(cfg, layout, seed=10 + i) for i, layout in enumerate((
        (("text", 5),),
        (("text", 4), ("audio", 6), ("eos", 1)),
        (("text", 7), ("audio", 3), ("eos", 1), ("text", 6)),
    ))]
    assert len({len(t) for t, _ in prompts}) == 3
    tokens, mask = _batch(prompts, seed=0)
    kw = dict(max_frames=6, temperature=0.9, top_k=5)
    batched = gen.generate_codes(tokens, mask, seed=3, **kw)
    assert isinstance(batched, list) and len(batched) == 3
    singles = [gen.generate_codes(t, m, seed=3 + i, **kw) for i, (t, m) in enumerate(prompts)]
    for i, (b, s) in enumerate(zip(batched, singles)):
        assert b.dtype == np.int32 and b.shape == (6, tiny.k), (i, b.shape)
        np.testing.assert_array_equal(b, s, err_msg=f"row {i}")

    # same seed -> same codes; another seed -> other codes; sampling differs from greedy
    t0, m0 = prompts[2]
    np.testing.assert_array_equal(gen.generate_codes(t0, m0, seed=5, **kw), singles[2])
    assert not np.array_equal(gen.generate_codes(t0, m0, seed=6, **kw), singles[2])
    assert not np.array_equal(greedy(gen, t0, m0, 6), singles[2])


def test_sampling_stays_in_top_k(tiny: GenCase) -> None:
    """Sampled codebook-0 and codebook-1 codes of the first frame are among the top_k of transformers' logits
    for that prefix, and sampling gives more than one value across seeds."""
    model, gen, k = tiny.model, tiny.gen, tiny.k
    tokens, mask = make_prompt(model.config, (("text", 4), ("audio", 6), ("eos", 1)), seed=11)
    t3, m3 = _batch([(tokens, mask)] * 3, seed=1)
    frames = np.concatenate([np.stack(gen.generate_codes(t3, m3, 1, temperature=1.5, top_k=3, seed=3 * j))[:, 0]
                             for j in range(6)])  # [18, K]: 18 seeds
    with torch.no_grad():
        h = model.backbone_model(inputs_embeds=embed_prompt(model, tokens, mask)).last_hidden_state[:, -1]
        top0 = set(torch.topk(model.lm_head(h)[0], 3).indices.tolist())
        assert set(frames[:, 0]) <= top0 and len(set(frames[:, 0])) >= 2
        for c0 in set(frames[:, 0]):
            ids = torch.tensor([[0, c0] + [0] * (k - 2)])  # placeholder, c0, (unused later codebooks)
            logits = model.depth_decoder(input_ids=ids, backbone_last_hidden_state=h).logits[0, 0]  # codebook 1
            top1 = set(torch.topk(logits, 3).indices.tolist())
            assert set(frames[frames[:, 0] == c0, 1]) <= top1


def test_depth_sampling_settings(tiny: GenCase) -> None:
    """Codebook 0 and the depth decoder's codebooks sample with their own settings (transformers' `temperature`,
    `top_k` and `depth_decoder_*`): a greedy codebook 0 under a hot depth decoder is transformers' argmax while
    codebooks 1.. vary; a hot codebook 0 under a greedy depth decoder varies, and each frame's codebooks 1.. are
    transformers' greedy depth decoding after that codebook 0."""
    model, gen, k, v = tiny.model, tiny.gen, tiny.k, tiny.model.config.vocab_size
    tokens, mask = make_prompt(model.config, (("text", 4), ("audio", 6), ("eos", 1)), seed=11)
    t, m = _batch([(tokens, mask)] * 8, seed=1)
    hot_depth = np.stack(gen.generate_codes(t, m, 1, top_k=1, seed=0, depth_temperature=2.0, depth_top_k=v))[:, 0]
    hot_c0 = np.stack(gen.generate_codes(t, m, 1, temperature=2.0, top_k=v, seed=0, depth_top_k=1))[:, 0]
    with torch.no_grad():
        h = model.backbone_model(inputs_embeds=embed_prompt(model, tokens, mask)).last_hidden_state[:, -1]
        assert set(hot_depth[:, 0]) == {int(model.lm_head(h)[0].argmax())}
        assert len({tuple(row[1:]) for row in hot_depth}) > 1
        assert len(set(hot_c0[:, 0])) > 1
        for row in hot_c0:
            ids = [0, int(row[0])]  # the backbone state's placeholder, then codebook 0
            for i in range(1, k):
                logits = model.depth_decoder(input_ids=torch.tensor([ids]), backbone_last_hidden_state=h).logits
                ids.append(int(logits[0, i - 1].argmax()))
            np.testing.assert_array_equal(row[1:], ids[2:])
    # temperature / top_k alone set every codebook; the depth settings are checked like them
    np.testing.assert_array_equal(np.stack(gen.generate_codes(t, m, 1, top_k=1)),
                                  np.stack(gen.generate_codes(t, m, 1, top_k=1, depth_top_k=1)))
    for bad in ({"depth_temperature": 0.0}, {"depth_top_k": 0}, {"depth_top_k": v + 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gen.generate_codes(tokens, mask, 1, top_k=5, **bad)


# ------------------------------------------------------------------------------- 4. max_frames, EOS ---
def test_max_frames(tiny: GenCase) -> None:
    tokens, mask = make_prompt(tiny.model.config, PROMPT, seed=0)
    full = greedy(tiny.gen, tokens, mask)
    for n in (1, 3):
        np.testing.assert_array_equal(greedy(tiny.gen, tokens, mask, n), full[:n])
    sampled = tiny.gen.generate_codes(tokens, mask, 4, temperature=0.9, top_k=5, seed=0)
    assert sampled.shape == (4, tiny.k)


def _edited(case: GenCase, edit) -> CsmForConditionalGeneration:
    """A copy of the transformers model with its depth-decoder heads [K-1, D, vocab] (head i-1 -> codebook i)
    edited in place by `edit`."""
    model = copy.deepcopy(case.model)
    with torch.no_grad():
        edit(model.depth_decoder.codebooks_head.weight)
    return model


def _load(model: CsmForConditionalGeneration, tmp_path_factory: pytest.TempPathFactory, name: str) -> Generator:
    path = tmp_path_factory.mktemp(f"csm_{name}")
    model.save_pretrained(path)
    return csm_jax.load_csm(path)


def test_eos_frame_stops_and_is_dropped(tiny: GenCase, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Zero depth heads: codebooks 1..K-1 are always 0 under greedy decoding (all-equal logits -> index 0 on
    both sides), so a frame whose codebook 0 is 0 is the all-zero EOS frame. Codebook-0 row 0 of lm_head is set to
    1.001 x the row of a code j that the greedy trajectory first reaches at frame f >= 3, so the EOS frame comes
    exactly at frame f. transformers stops there and keeps it; csm_jax stops there and drops it. In a batch, the
    finished row stops and the other goes on."""
    model = _edited(tiny, lambda w: w.zero_())
    for seed in range(40):
        tokens, mask = make_prompt(model.config, PROMPT, seed=100 + seed)
        c0 = hf_greedy_embeds(model, tokens, mask, 16)[:, 0].tolist()
        late = [c for c in sorted(set(c0)) if 3 <= c0.index(c) <= 10]
        if late and len(c0) == 16:
            break
    else:
        raise AssertionError("no prompt whose greedy trajectory reaches a new code late")
    j, f = late[0], c0.index(late[0])
    with torch.no_grad():
        model.lm_head.weight[0] = 1.001 * model.lm_head.weight[j]
    ref = hf_greedy_embeds(model, tokens, mask, 16)
    assert len(ref) == f + 1 and not ref[-1].any() and ref[:-1, 0].all(), ref  # EOS frame at f, kept by HF
    gen = _load(model, tmp_path_factory, "eos")

    codes = greedy(gen, tokens, mask, 16)
    assert codes.shape == (f, tiny.k)
    np.testing.assert_array_equal(codes, ref[:-1])
    # a budget that ends right at the EOS frame gives the same frames; a shorter one cuts them
    np.testing.assert_array_equal(greedy(gen, tokens, mask, f + 1), codes)
    np.testing.assert_array_equal(greedy(gen, tokens, mask, f), codes)
    np.testing.assert_array_equal(greedy(gen, tokens, mask, 2), codes[:2])

    # batched: row 0 hits EOS at frame f, row 1 (a prompt without EOS within 12 frames) keeps going
    for seed in range(40):
        t1, m1 = make_prompt(model.config, (("text", 9),), seed=500 + seed)
        other = greedy(gen, t1, m1, 12)
        if len(other) == 12:
            break
    else:
        raise AssertionError("no prompt without EOS")
    tb, mb = _batch([(tokens, mask), (t1, m1)], seed=2)
    batched = gen.generate_codes(tb, mb, 12, top_k=1)
    np.testing.assert_array_equal(batched[0], codes)
    np.testing.assert_array_equal(batched[1], other)


def test_eos_needs_all_codebooks_zero(tiny: GenCase, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Heads 1..K-2 zero, head K-1 never picks 0 (its column 0 is zero and column 2 = -column 1, so one of them is
    positive): a frame with codebook 0 = 0 is [0, .., 0, x != 0]. transformers stops there (its rule looks at
    codebooks 0..K-2 only); the original rule — and csm_jax — needs all K zero and goes on. The continuation is
    checked against transformers restarted from the prompt plus the frames so far."""
    def edit(w):
        w[:-1].zero_()
        w[-1, :, 0] = 0
        w[-1, :, 2] = -w[-1, :, 1]

    k = tiny.k
    model = _edited(tiny, edit)
    for seed in range(40):
        tokens, mask = make_prompt(model.config, PROMPT, seed=100 + seed)
        ref = hf_greedy_embeds(model, tokens, mask, 16)
        if 2 <= len(ref) <= 10:  # transformers stopped early
            break
    else:
        raise AssertionError("no prompt on which transformers stops within 10 frames")
    assert not ref[-1, :-1].any() and ref[-1, -1] != 0 and ref[:-1, 0].all(), ref
    gen = _load(model, tmp_path_factory, "near_eos")
    codes = greedy(gen, tokens, mask, 16)
    assert len(codes) == 16  # never all-zero, so never stops early
    np.testing.assert_array_equal(codes[: len(ref)], ref)
    done = len(ref)
    ctx_t, ctx_m = audio_rows(codes[:done], k)
    ref2 = hf_greedy_embeds(model, np.concatenate([tokens, ctx_t]), np.concatenate([mask, ctx_m]), 16 - done)
    np.testing.assert_array_equal(codes[done: done + len(ref2)], ref2)
    assert len(ref2) >= 1


# ------------------------------------------------------------------------------------- 5. text API ---
def test_text_rows(tiny: GenCase) -> None:
    k = tiny.k
    tokens, mask = tiny.gen.text_rows("Hello", 0)
    want = [VOCAB["<|begin_of_text|>"], *char_ids("[0]Hello"), VOCAB["<|end_of_text|>"]]
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_ and tokens.shape == (len(want), k + 1)
    assert tokens[:, k].tolist() == want
    assert not tokens[:, :k].any()
    assert mask[:, k].all() and not mask[:, :k].any()
    t3, _ = tiny.gen.text_rows("hi", np.int64(3))
    assert t3[:, k].tolist() == [VOCAB["<|begin_of_text|>"], *char_ids("[3]hi"), VOCAB["<|end_of_text|>"]]


def test_prompt_layout(tiny: GenCase) -> None:
    """Context segments: text rows then audio rows (Mimi codes + one all-zero EOS frame); then the target text
    rows. A segment without audio contributes text rows only."""
    model, gen, k = tiny.model, tiny.gen, tiny.k
    audio = sine(3, freq=330.0, seed=2)[: 2 * FRAME + 700]  # 2.36 frames -> ceil = 3 codec frames
    with torch.no_grad():
        hf_codes = model.codec_model.encode(torch.from_numpy(audio)[None, None]).audio_codes[0].numpy()
    assert hf_codes.shape == (k, 3)
    tokens, mask = gen.prompt("ok.", 0, [csm_jax.Segment(1, "hi there.", audio), csm_jax.Segment(0, "yes")])

    def text(s: str) -> list[int]:
        return [VOCAB["<|begin_of_text|>"], *char_ids(s), VOCAB["<|end_of_text|>"]]

    rows = [("text", i) for i in text("[1]hi there.")] + [("audio", c) for c in hf_codes.T] \
        + [("audio", np.zeros(k, int))] + [("text", i) for i in text("[0]yes") + text("[0]ok.")]
    assert tokens.shape == (len(rows), k + 1) and mask.shape == tokens.shape
    for r, (kind, value) in enumerate(rows):
        if kind == "text":
            assert tokens[r, k] == value and mask[r].tolist() == [False] * k + [True], r
            assert not tokens[r, :k].any(), r
        else:
            assert tokens[r, :k].tolist() == list(value) and mask[r].tolist() == [True] * k + [False], r
            assert tokens[r, k] == 0, r
    # no context: just the target's text rows
    t0, m0 = gen.prompt("ok.", 0)
    np.testing.assert_array_equal(t0, gen.text_rows("ok.", 0)[0])
    np.testing.assert_array_equal(m0, gen.text_rows("ok.", 0)[1])


def test_generate_and_stream(tiny: GenCase) -> None:
    """generate() = one 1920-sample chunk per generated frame, decoding the codes generate_codes gives for the same
    prompt and seed; stream() yields its first chunk after one frame step and concatenates to generate()."""
    model, gen, k = tiny.model, tiny.gen, tiny.k
    context = [csm_jax.Segment(1, "hi there.", sine(2, seed=3))]
    kw = dict(temperature=0.9, top_k=5, seed=4)
    audio = gen.generate("how are you?", 0, context, max_audio_ms=800, **kw)
    codes = gen.generate_codes(*gen.prompt("how are you?", 0, context), 10, **kw)
    assert len(codes) == 10
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and audio.shape == (FRAME * len(codes),)
    assert np.isfinite(audio).all() and audio.std() > 0
    with torch.no_grad():  # transformers' Mimi decoding the same codes (offline)
        ref = model.codec_model.decode(torch.from_numpy(codes.T[None].astype(np.int64))).audio_values[0, 0].numpy()
    np.testing.assert_allclose(audio, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))

    engine = gen.engine(1)
    calls = []
    step = engine.step
    engine.step = lambda state: (calls.append(1), step(state))[1]
    try:
        it = gen.stream("how are you?", 0, context, max_audio_ms=800, **kw)
        first = next(it)
        assert len(calls) == 1
        assert isinstance(first, np.ndarray) and first.dtype == np.float32 and first.shape == (FRAME,)
        rest = list(it)
    finally:
        del engine.step
    assert len(calls) == 10 and len(rest) == 9
    np.testing.assert_array_equal(np.concatenate([first, *rest]), audio)

    short = gen.generate("ok.", 1, max_audio_ms=160, **kw)  # 160 ms = 2 frames
    assert short.shape == (2 * FRAME,)


def test_generated_audio_codes_stay_decodable(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`rope` has a CSM vocab of 17 but a 16-entry Mimi (as CSM-1B's 2051 vs 2048): sampling over the whole vocab
    with a flat-ish distribution would draw code 16 several times in 10 frames x 8 codebooks, which Mimi cannot
    decode; audio generation must keep to decodable codes."""
    case = get_case("rope", tmp_path_factory)
    assert case.gen.codec.config.codebook_size == 16 < case.model.config.vocab_size
    for seed in range(3):
        audio = case.gen.generate("hi", 0, max_audio_ms=800, temperature=2.0, top_k=17, seed=seed)
        assert audio.shape == (10 * FRAME,) and np.isfinite(audio).all()


# --------------------------------------------------------------------------------------- 6. errors ---
def test_text_api_errors(tiny: GenCase) -> None:
    gen = tiny.gen
    audio = sine(1)
    for text in ("", "   \n\t"):
        with pytest.raises(ValueError, match="non-empty"):
            gen.generate(text, 0)
        with pytest.raises(ValueError, match="non-empty"):
            gen.prompt("ok", 0, [csm_jax.Segment(1, text)])
    for speaker in ("0", 0.0, -1, True):
        with pytest.raises(TypeError, match="speaker"):
            gen.generate("hi", speaker)
        with pytest.raises(TypeError, match="speaker"):
            gen.prompt("hi", 0, [csm_jax.Segment(speaker, "yo", audio)])
    with pytest.raises(TypeError, match="Segment"):
        gen.prompt("hi", 0, [(1, "yo", audio)])
    with pytest.raises(TypeError, match="Segment"):
        gen.generate("hi", 0, context=["yo"])
    with pytest.raises(ValueError, match="mono"):
        gen.prompt("hi", 0, [csm_jax.Segment(1, "yo", np.stack([audio, audio]))])
    with pytest.raises(ValueError, match="exceeds"):  # 20 s = 250 frames > 128 positions
        gen.generate("hi", 0, max_audio_ms=20_000, top_k=5)
    with pytest.raises(ValueError, match="top_k"):  # the default top_k=50 exceeds this tiny vocab (16)
        gen.generate("hi", 0, max_audio_ms=160)

    bare = no_tokenizer_generator(tiny)
    for call in (lambda: bare.text_rows("hi", 0), lambda: bare.prompt("hi", 0), lambda: bare.generate("hi", 0),
                 lambda: list(bare.stream("hi", 0))):
        with pytest.raises(ValueError, match="tokenizer"):
            call()
    no_codec = Generator(tiny.gen.params, tiny.gen.cfg, None, tiny.gen.tokenizer)
    with pytest.raises(ValueError, match="codec"):
        no_codec.prompt("hi", 0, [csm_jax.Segment(1, "yo", audio)])
    with pytest.raises(ValueError, match="codec"):
        no_codec.generate("hi", 0, top_k=5)
    assert no_codec.prompt("hi", 0, [csm_jax.Segment(1, "yo")])[0].shape[0] == 2 * 2 + len("[1]yo[0]hi")


def test_generate_codes_errors(tiny: GenCase) -> None:
    gen, k, cfg = tiny.gen, tiny.k, tiny.model.config
    tokens, mask = make_prompt(cfg, PROMPT, seed=0)

    def call(t=tokens, m=mask, n=4, **kw):
        return gen.generate_codes(t, m, n, **{"top_k": 5, **kw})

    with pytest.raises(TypeError, match="integer"):
        call(t=tokens.astype(np.float32))
    with pytest.raises(TypeError, match="bool"):
        call(m=mask.astype(np.int32))
    with pytest.raises(ValueError, match=rf"\[S, {k + 1}\]"):
        call(t=tokens[:, :k], m=mask[:, :k])
    with pytest.raises(ValueError, match=rf"\[S, {k + 1}\]"):
        call(m=mask[:-1])
    with pytest.raises(ValueError, match=rf"\[S, {k + 1}\]"):
        call(t=tokens[None, None], m=mask[None, None])
    with pytest.raises(ValueError, match="empty"):
        call(m=np.zeros_like(mask))
    with pytest.raises(ValueError, match="empty"):  # one empty row in a batch
        call(t=np.stack([tokens, tokens]), m=np.stack([mask, np.zeros_like(mask)]))
    audio_row = int(np.flatnonzero(mask[:, 0])[0])
    text_row = int(np.flatnonzero(mask[:, k])[0])
    for row, col, value in ((audio_row, 1, cfg.vocab_size), (audio_row, 0, -1), (text_row, k, cfg.text_vocab_size),
                            (text_row, k, -3)):
        bad = tokens.copy()
        bad[row, col] = value
        with pytest.raises(ValueError, match="out of range"):
            call(t=bad)
    with pytest.raises(ValueError, match="exceeds"):
        call(n=cfg.max_position_embeddings - len(tokens) + 1)
    for temperature in (0, 0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            call(temperature=temperature)
    for top_k in (0, -1, cfg.vocab_size + 1, 5.0, True):
        with pytest.raises(ValueError, match="top_k"):
            call(top_k=top_k)
    for n in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_frames"):
            call(n=n)


def test_masked_columns_are_ignored(tiny: GenCase) -> None:
    """Whatever sits in a masked-out column — here ids far outside the tables, or -100 (a common "ignore"
    filler) — must not change the result: the row's input is the sum over the unmasked columns only."""
    tokens, mask = make_prompt(tiny.model.config, PROMPT, seed=0)
    ref = greedy(tiny.gen, tokens, mask, 4)
    assert len(ref) == 4
    for filler in (10**6, -100):
        dirty = np.where(mask, tokens, filler).astype(np.int32)
        np.testing.assert_array_equal(greedy(tiny.gen, dirty, mask, 4), ref, err_msg=f"filler {filler}")


def test_input_codebooks(tiny: GenCase) -> None:
    """`CsmConfig.input_codebooks = m`: the backbone embeds only codebooks 0..m-1 of every audio row, in training
    (`backbone_forward`) and in generation (prompt rows and the frames fed back) alike; the depth decoder still
    makes all K codebooks. Oracle: the unchanged model, teacher-forced on the same rows with columns m..K-1 masked
    out, must give each generated frame's codebook 0 as its greedy choice."""
    k, m = tiny.gen.cfg.num_codebooks, 2
    cfg = tiny.gen.cfg.replace(input_codebooks=m)
    gen = csm_jax.Generator(tiny.gen.params, cfg, tiny.gen.codec, None)
    tokens, mask = make_prompt(tiny.model.config, PROMPT, seed=0)
    codes = greedy(gen, tokens, mask, 6)
    assert codes.shape == (6, k) and len(np.unique(codes[:, m:])) > 1
    frames, frame_mask = audio_rows(codes, k)
    seq = np.concatenate([tokens, frames])
    seq_mask = np.concatenate([mask, frame_mask])
    seq_mask[:, m:k] = False
    model = Csm(tiny.gen.cfg)
    logits, _ = model.apply({"params": tiny.gen.params}, seq[None], seq_mask[None], method=Csm.backbone_forward)
    n = len(tokens)
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[0, n - 1:n + 5]), -1), codes[:, 0])
    # the model with input_codebooks reads the unmasked rows exactly as the unchanged one reads the masked rows
    full_mask = np.concatenate([mask, audio_rows(codes, k)[1]])
    ours, _ = Csm(cfg).apply({"params": tiny.gen.params}, seq[None], full_mask[None], method=Csm.backbone_forward)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(logits))
    for bad in (0, k + 1, 1.0, True):
        for name in ("input_codebooks", "context_codebooks"):
            with pytest.raises(ValueError, match=name):
                tiny.gen.cfg.replace(**{name: bad})


def test_context_codebooks(tiny: GenCase) -> None:
    """`context_codebooks = K` with `input_codebooks = m`: the prompt's audio rows are read with all K codebooks,
    the frames fed back with 0..m-1. Oracle: the unchanged model, teacher-forced on the prompt as it is and the
    generated frames with columns m..K-1 masked out, gives each generated frame's codebook 0 as its greedy choice;
    and it differs from the model reading 0..m-1 everywhere."""
    k, m = tiny.gen.cfg.num_codebooks, 1
    cfg = tiny.gen.cfg.replace(input_codebooks=m, context_codebooks=k)
    gen = csm_jax.Generator(tiny.gen.params, cfg, tiny.gen.codec, None)
    tokens, mask = make_prompt(tiny.model.config, PROMPT, seed=0)
    codes = greedy(gen, tokens, mask, 6)
    frames, frame_mask = audio_rows(codes, k)
    frame_mask[:, m:k] = False
    seq, seq_mask = np.concatenate([tokens, frames]), np.concatenate([mask, frame_mask])
    logits, _ = Csm(tiny.gen.cfg).apply({"params": tiny.gen.params}, seq[None], seq_mask[None],
                                        method=Csm.backbone_forward)
    n = len(tokens)
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[0, n - 1:n + 5]), -1), codes[:, 0])
    narrow = csm_jax.Generator(tiny.gen.params, tiny.gen.cfg.replace(input_codebooks=m), tiny.gen.codec, None)
    assert not np.array_equal(greedy(narrow, tokens, mask, 6), codes)


def test_seed_and_numpy_scalars(tiny: GenCase) -> None:
    """Seeds must be usable PRNG seeds (clear errors otherwise); numpy scalars are accepted like Python ones."""
    tokens, mask = make_prompt(tiny.model.config, PROMPT, seed=0)
    for bad in (-1, 2**32, 1.5, True, "0"):
        with pytest.raises(ValueError, match="seed"):
            tiny.gen.generate_codes(tokens, mask, 2, top_k=5, seed=bad)
    with pytest.raises(ValueError, match="seed"):  # row i uses seed + i: the last row would overflow
        tiny.gen.generate_codes(np.stack([tokens] * 2), np.stack([mask] * 2), 2, top_k=5, seed=2**32 - 1)
    plain = tiny.gen.generate_codes(tokens, mask, 3, temperature=0.9, top_k=5, seed=4)
    numpy_args = tiny.gen.generate_codes(tokens, mask, np.int64(3), temperature=np.float32(0.9),
                                         top_k=np.int32(5), seed=np.uint32(4))
    np.testing.assert_array_equal(plain, numpy_args)


def test_stream_validates_before_the_first_chunk(tiny: GenCase) -> None:
    """A server must learn about bad input when it calls stream(), before it starts a response."""
    with pytest.raises(ValueError, match="temperature"):
        tiny.gen.stream("hello", 0, temperature=0)
    with pytest.raises(ValueError, match="non-empty"):
        tiny.gen.stream("", 0)
