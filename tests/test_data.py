"""Corpus preparation (batched Mimi encode -> shards) and the training batch loader, on real espeak-ng speech.

One small corpus (5 conversations x 4 turns, 4 voices), the default model's random tiny Mimi and the byte tokenizer.
"""

import importlib
import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf

from csm_jax.audio.processor import load_audio
from csm_jax.codec.codec import MimiCodec
from csm_jax.csm.prompt import PromptFormat, code_rows
from csm_jax.data import (Dataset, DatasetError, Loader, ManifestError, PrepareError, bucket_frames,
                          make_espeak_corpus, prepare, read_manifest, split)
from csm_jax.default_model import byte_tokenizer, tiny_mimi_config

prepare_mod = importlib.import_module("csm_jax.data.prepare")  # csm_jax.data.prepare is also the function
K, VOCAB = 8, 2051
SHARD_SIZE, BATCH_SECONDS = 8, 10.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_espeak_corpus(tmp_path_factory.mktemp("corpus"), num_conversations=5, turns=4, seed=0)


@pytest.fixture(scope="module")
def codec():
    return MimiCodec.random(tiny_mimi_config(), seed=1)


@pytest.fixture(scope="module")
def fmt():
    return PromptFormat(byte_tokenizer(), K, VOCAB)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, codec, fmt):
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare(corpus, out, codec, fmt, K, shard_size=SHARD_SIZE, batch_seconds=BATCH_SECONDS, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def dataset(prepared):
    return Dataset.open(prepared[0])


def _copy(prepared, tmp_path):
    dst = tmp_path / "prepared"
    shutil.copytree(prepared[0], dst)
    return dst


def _prep(manifest, out, codec, fmt, **kw):
    return prepare(manifest, out, codec, fmt, K, shard_size=SHARD_SIZE, batch_seconds=BATCH_SECONDS,
                   progress=False, **kw)


# preparation ---------------------------------------------------------------------------------------------------
def test_prepared_layout_index_and_summary(prepared, dataset, corpus):
    out, summary = prepared
    utts = read_manifest(corpus)
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json", "index.jsonl", "shard-00000.npz", "shard-00001.npz", "shard-00002.npz", "summary.json"]
    samples = [len(load_audio(u.audio)) for u in utts]
    frames = [math.ceil(n / 1920) for n in samples]
    assert summary.utterances == 20 and summary.conversations == 5 and summary.shards == 3
    assert summary.speakers == len({u.speaker for u in utts}) >= 2
    assert summary.frames == sum(frames) and summary.num_codebooks == K and summary.frame_rate == 12.5
    assert summary.seconds == pytest.approx(sum(samples) / 24000, abs=1e-3)
    assert summary.hours == pytest.approx(summary.seconds / 3600, abs=1e-6)
    assert 5 < summary.seconds < 100
    assert json.loads((out / "summary.json").read_text()) == summary.to_dict()
    assert "utterances" in str(summary) and "20" in str(summary)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["complete"] and meta["num_codebooks"] == K
    assert meta["fingerprint"]["codec"]["config"]["num_quantizers"] == 8
    assert len(dataset) == 20
    for i, (u, e) in enumerate(zip(utts, dataset.entries)):
        assert (e.id, e.conversation, e.turn, e.speaker, e.text) == (i, u.conversation, u.turn, u.speaker, u.text)
        assert (e.samples, e.frames, e.shard) == (samples[i], frames[i], i // SHARD_SIZE)
        assert e.extra == dict(u.extra)
        assert dataset.codes(i).shape == (frames[i], K) and dataset.codes(i).dtype == np.int16
        expected_ids = PromptFormat(byte_tokenizer(), K, VOCAB).text_ids(u.text, u.speaker)
        np.testing.assert_array_equal(dataset.text_ids(i), expected_ids)
    loaded = Dataset.open(out, mmap=False)
    assert isinstance(dataset.codes(0), np.memmap) and not isinstance(loaded.codes(0), np.memmap)
    for i in range(len(dataset)):
        np.testing.assert_array_equal(dataset.codes(i), loaded.codes(i))


def test_batched_codes_equal_one_by_one_encode(dataset, codec):
    """Batching and bucket padding change no code: an utterance's codes equal codec.encode of its own audio
    (zero-padded to whole frames) alone. Checked (one compile per frame count) on the most padded utterance and on
    every utterance of the most common frame count."""
    frames = [e.frames for e in dataset.entries]
    most_padded = max(range(len(frames)), key=lambda i: (bucket_frames(frames[i]) - frames[i]) / frames[i])
    common = max(set(frames), key=frames.count)
    chosen = sorted({most_padded} | {i for i, f in enumerate(frames) if f == common})
    assert bucket_frames(frames[most_padded]) > frames[most_padded] and len(chosen) >= 2
    for i in chosen:
        e = dataset[i]
        audio = load_audio(e.audio)
        padded = np.zeros(e.frames * 1920, np.float32)
        padded[:len(audio)] = audio
        alone = np.asarray(codec.encode(padded[None]))[0].T
        np.testing.assert_array_equal(dataset.codes(i), alone, err_msg=f"utterance {i} ({e.frames} frames)")
    # the raw (not frame-aligned) audio: Mimi's offline end padding may change the last frame only
    audio = load_audio(dataset[most_padded].audio)
    assert len(audio) % 1920
    raw = np.asarray(codec.encode(audio[None]))[0].T
    assert raw.shape == dataset.codes(most_padded).shape
    np.testing.assert_array_equal(raw[:-1], dataset.codes(most_padded)[:-1])


def test_resume_after_interruption_and_lost_shard(prepared, corpus, codec, fmt, tmp_path, monkeypatch):
    reference = {p.name: p.read_bytes() for p in prepared[0].glob("shard-*.npz")}
    loaded = []
    real_load = prepare_mod._load
    monkeypatch.setattr(prepare_mod, "_load", lambda u: loaded.append(u.key) or real_load(u))
    real_encode = prepare_mod._encode_shard

    def interrupt_second(utts, *args):
        if utts[0].key == ("c0002", 0):
            raise KeyboardInterrupt  # killed while encoding shard 1
        return real_encode(utts, *args)

    out = tmp_path / "p"
    monkeypatch.setattr(prepare_mod, "_encode_shard", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        _prep(corpus, out, codec, fmt)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "shard-00000.npz"]
    assert not json.loads((out / "dataset.json").read_text())["complete"]
    with pytest.raises(DatasetError, match="incomplete"):
        Dataset.open(out)
    (out / "shard-00001.npz.tmp").write_bytes(b"half a shard")  # the interrupted write's leftover

    monkeypatch.setattr(prepare_mod, "_encode_shard", real_encode)
    loaded.clear()
    summary = _prep(corpus, out, codec, fmt)
    assert len(loaded) == 12 and ("c0000", 0) not in loaded  # shard 0 was not redone
    assert summary == prepared[1]
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.npz")} == reference
    assert not list(out.glob("*.tmp"))
    assert (out / "index.jsonl").read_text() == (prepared[0] / "index.jsonl").read_text()

    (out / "shard-00001.npz").unlink()  # lost shard: only it is redone
    loaded.clear()
    _prep(corpus, out, codec, fmt)
    assert sorted(loaded) == sorted(u.key for u in read_manifest(corpus)[8:16])
    assert (out / "shard-00001.npz").read_bytes() == reference["shard-00001.npz"]

    loaded.clear()
    _prep(corpus, out, codec, fmt)  # complete: nothing to do
    assert loaded == []
    _prep(corpus, out, codec, fmt, force=True)  # force: everything again
    assert len(loaded) == 20
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.npz")} == reference


def test_out_dir_prepared_with_another_config(prepared, corpus, codec, fmt, tmp_path):
    out = _copy(prepared, tmp_path)
    with pytest.raises(PrepareError, match=r"different num_codebooks 8 \(now 4\)"):
        prepare(corpus, out, codec, fmt, 4, shard_size=SHARD_SIZE, progress=False)
    other_weights = MimiCodec(
        {**codec.params, "downsample": {"kernel": codec.params["downsample"]["kernel"] * 1.01}}, codec.config)
    with pytest.raises(PrepareError, match="different codec encoder weights"):
        _prep(corpus, out, other_weights, fmt)
    # A decoder that trained further leaves the codes as they were: the prepared dataset stays valid.
    decoder_tuned = MimiCodec({**codec.params, "upsample": {"kernel": codec.params["upsample"]["kernel"] * 1.01}},
                              codec.config)
    _prep(corpus, out, decoder_tuned, fmt)
    other_config = MimiCodec(codec.params, codec.config.replace(sliding_window=100))
    with pytest.raises(PrepareError, match="different codec config"):
        _prep(corpus, out, other_config, fmt)
    other_tok = byte_tokenizer()
    other_tok.add_special_tokens(["<|extra|>"])
    with pytest.raises(PrepareError, match="tokenizer"):
        _prep(corpus, out, codec, PromptFormat(other_tok, K, VOCAB))
    with pytest.raises(PrepareError, match="shard_size 8 \\(now 4\\)"):
        prepare(corpus, out, codec, fmt, K, shard_size=4, progress=False)
    assert Dataset.open(out).entries == Dataset.open(prepared[0]).entries  # untouched by the refusals
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-00000.npz").write_bytes(b"")
    with pytest.raises(PrepareError, match="no dataset.json"):
        _prep(corpus, foreign, codec, fmt)


def test_unreadable_audio_and_bad_manifests(corpus, codec, fmt, tmp_path):
    records = [json.loads(line) for line in corpus.read_text().splitlines()[:2]]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    records[0]["audio"] = str(corpus.parent / records[0]["audio"])
    records[1]["audio"] = str(bad)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(PrepareError, match=r"m\.jsonl:2: cannot read audio .*broken\.wav"):
        _prep(manifest, tmp_path / "out", codec, fmt)
    manifest.write_text("\n")
    with pytest.raises(ManifestError, match="empty corpus"):
        _prep(manifest, tmp_path / "out2", codec, fmt)
    with pytest.raises(ManifestError, match="manifest not found"):
        _prep(tmp_path / "missing.jsonl", tmp_path / "out3", codec, fmt)
    with pytest.raises(PrepareError, match="num_codebooks"):
        prepare(corpus, tmp_path / "out4", codec, fmt, 9, progress=False)
    with pytest.raises(PrepareError, match="audio_vocab_size"):
        _prep(corpus, tmp_path / "out5", codec, fmt, audio_vocab_size=1000)


def test_bucket_ladder():
    assert [bucket_frames(f) for f in (1, 8, 9, 12, 13, 16, 17, 25, 33, 49, 97)] == [8, 8, 12, 12, 16, 16, 24, 32, 48,
                                                                                   64, 128]


# loader --------------------------------------------------------------------------------------------------------
def _turn(dataset, fmt, i, k=K):
    e = dataset[i]
    t_tok, t_mask = PromptFormat(fmt.tokenizer, k, VOCAB).text_rows(e.text, e.speaker)
    c_tok, c_mask = code_rows(dataset.codes(i).astype(np.int32)[:, :k], k, VOCAB)
    return t_tok, t_mask, c_tok, c_mask


def _expected(dataset, fmt, target, max_rows, context_turns, k=K, all_turns=False):
    """The prompt for `target` built independently: most recent whole previous turns that fit, then the target."""
    conv = sorted((i for i, e in enumerate(dataset.entries) if e.conversation == dataset[target].conversation),
                  key=lambda i: dataset[i].turn)
    rows = lambda i: sum(len(x) for x in _turn(dataset, fmt, i, k)[::2])  # noqa: E731
    budget = max_rows - rows(target)
    context = []
    for i in reversed(conv[:conv.index(target)][-context_turns:] if context_turns else []):
        if rows(i) > budget:
            break
        budget -= rows(i)
        context.insert(0, i)
    toks, masks, targets = [], [], []
    for i in context + [target]:
        t_tok, t_mask, c_tok, c_mask = _turn(dataset, fmt, i, k)
        toks += [t_tok, c_tok]
        masks += [t_mask, c_mask]
        targets += [np.zeros(len(t_tok), bool), np.full(len(c_tok), i == target or all_turns)]
    return np.concatenate(toks), np.concatenate(masks), np.concatenate(targets), context


def _all_batches(loader, count):
    return [loader.next_batch() for _ in range(count)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("k", [K, 4])
def test_batches_are_csm_prompts(dataset, fmt, k):
    max_rows = 200
    loader = Loader(dataset, PromptFormat(fmt.tokenizer, k, VOCAB, None, 3), batch_size=3, max_rows=max_rows, seed=5)
    seen, truncated = set(), 0
    for batch in loader:
        b, s, width = batch["tokens"].shape
        assert b == 3 and width == k + 1 and s in loader.buckets
        assert batch["tokens"].dtype == np.int32 and batch["mask"].dtype == bool
        assert batch["targets"].shape == (b, s) and batch["lengths"].dtype == np.int32
        valid = batch["lengths"] > 0
        assert s == min(x for x in loader.buckets if x >= batch["lengths"].max())
        for r in range(b):
            n, uid = batch["lengths"][r], batch["ids"][r]
            if n == 0:
                assert uid == -1 and not batch["mask"][r].any() and not batch["targets"][r].any()
                continue
            target = next(i for i, e in enumerate(dataset.entries) if e.id == uid)
            tokens, mask, targets, context = _expected(dataset, fmt, target, max_rows, 3, k)
            assert n == len(tokens) <= max_rows
            np.testing.assert_array_equal(batch["tokens"][r, :n], tokens)
            np.testing.assert_array_equal(batch["mask"][r, :n], mask)
            np.testing.assert_array_equal(batch["targets"][r, :n], targets)
            assert batch["targets"][r].sum() == dataset[target].frames + 1  # target audio rows + end frame
            assert not batch["mask"][r, n:].any() and not batch["tokens"][r, n:].any()
            assert not batch["targets"][r, n:].any()
            earlier = [e for e in dataset.entries if e.conversation == dataset[target].conversation
                       and e.turn < dataset[target].turn]
            truncated += len(context) < min(3, len(earlier))
            seen.add(int(uid))
        assert valid.sum() >= 1
    assert seen == {e.id for e in dataset.entries}  # one epoch covers every utterance once
    assert truncated > 0  # max_rows really limited some contexts


def test_all_turns_as_targets(dataset, fmt):
    """target_turns="all": the same rows, every turn's audio (codes and end frame) predicted, never text."""
    pf = PromptFormat(fmt.tokenizer, K, VOCAB, None, 3)
    last = Loader(dataset, pf, batch_size=3, max_rows=200, seed=5)
    every = Loader(dataset, pf, batch_size=3, max_rows=200, seed=5, target_turns="all")
    with_context = 0
    for a, b in zip(last, every):
        for key in ("tokens", "mask", "lengths", "ids"):
            np.testing.assert_array_equal(a[key], b[key])
        for r, uid in enumerate(b["ids"]):
            if uid < 0:
                continue
            target = next(i for i, e in enumerate(dataset.entries) if e.id == uid)
            _, _, targets, context = _expected(dataset, fmt, target, 200, 3, all_turns=True)
            np.testing.assert_array_equal(b["targets"][r, :len(targets)], targets)
            assert b["targets"][r].sum() == sum(dataset[i].frames + 1 for i in (*context, target))
            with_context += bool(context)
    assert with_context > 0
    with pytest.raises(ValueError, match="target_turns"):
        Loader(dataset, pf, batch_size=3, max_rows=200, target_turns="some")
    assert every.state()["fingerprint"] != last.state()["fingerprint"]


def test_context_limits(dataset, fmt):
    full = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB, None, 16), batch_size=2, max_rows=2048, shuffle=False)
    for ex in full.examples:  # everything fits: the context is every earlier turn of the conversation
        e = dataset[ex.target]
        assert [dataset[i].turn for i in ex.context] == list(range(e.turn))
        assert all(dataset[i].conversation == e.conversation for i in ex.context)
    one = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB, None, 1), batch_size=2, max_rows=2048, shuffle=False)
    assert all(len(ex.context) == min(1, dataset[ex.target].turn) for ex in one.examples)
    none = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB, None, 0), batch_size=2, max_rows=2048, shuffle=False)
    assert all(ex.context == () for ex in none.examples)
    for ex in Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), batch_size=2, max_rows=150, shuffle=False).examples:
        assert ex.length <= 150
        e = dataset[ex.target]
        if ex.context:  # contiguous, ending right before the target
            assert [dataset[i].turn for i in ex.context] == list(range(e.turn - len(ex.context), e.turn))


def test_too_long_targets_are_skipped(dataset, fmt):
    own = {e.id: e.text_len + e.frames + 1 for e in dataset.entries}
    limit = sorted(own.values())[len(own) // 2]
    with pytest.warns(UserWarning, match="longer than max_rows"):
        loader = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), batch_size=2, max_rows=limit, buckets=(limit,))
    assert sorted(loader.skipped) == sorted(i for i, n in own.items() if n > limit)
    assert {dataset[ex.target].id for ex in loader.examples} == {i for i, n in own.items() if n <= limit}
    for batch in loader:
        assert batch["tokens"].shape[1] == limit
    with pytest.raises(ValueError, match="no utterance fits"), pytest.warns(UserWarning):
        Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), batch_size=2, max_rows=10)


def test_buckets_and_length_grouping(dataset, fmt):
    loader = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), batch_size=4, max_rows=400, buckets=(64, 96, 128, 192, 256, 400),
                    group_batches=100, seed=1)
    lengths = []
    for batch in loader:
        s = batch["tokens"].shape[1]
        longest = batch["lengths"].max()
        assert s == min(b for b in loader.buckets if b >= longest)
        lengths.append(sorted(batch["lengths"][batch["lengths"] > 0]))
    # one window covers the epoch, so the batches hold disjoint length ranges (sorted before cutting)
    lengths.sort()
    for a, b in zip(lengths, lengths[1:]):
        assert a[-1] <= b[0]
    with pytest.raises(ValueError, match="buckets"):
        Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), batch_size=4, max_rows=400, buckets=(64, 128))


def test_drop_last_and_padding_examples(dataset, fmt):
    loader = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), batch_size=3, max_rows=2048, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 20 // 3 and all((b["lengths"] > 0).all() for b in batches)
    padded = list(Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), batch_size=3, max_rows=2048))
    assert len(padded) == 7 and sum((b["lengths"] > 0).sum() for b in padded) == 20
    assert sum((b["ids"] == -1).sum() for b in padded) == 1


def test_deterministic_and_reshuffled_each_epoch(dataset, fmt):
    def make(seed):
        return Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), batch_size=2, max_rows=300, seed=seed, group_batches=2)

    a, b = make(7), make(7)
    n = len(a)
    run_a, run_b = _all_batches(a, 2 * n), _all_batches(b, 2 * n)
    _assert_batches_equal(run_a, run_b)
    ids = lambda batches: [tuple(x["ids"]) for x in batches]  # noqa: E731
    assert ids(run_a[:n]) != ids(run_a[n:])  # epoch 1 is reshuffled
    assert sorted(sum(ids(run_a[:n]), ())) == sorted(sum(ids(run_a[n:]), ()))
    assert ids(_all_batches(make(8), n)) != ids(run_a[:n])
    ordered = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), batch_size=2, max_rows=300, shuffle=False, group_batches=2)
    assert ids(list(ordered)) == ids(list(ordered))  # unshuffled epochs repeat


def test_exact_resume_mid_epoch_and_across_epochs(dataset, fmt):
    kw = dict(batch_size=3, max_rows=300, seed=11, group_batches=2)
    reference = _all_batches(Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), **kw), 21)  # 7 batches an epoch: 3 epochs
    for stop in (0, 4, 7, 10, 15):
        first = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), **kw)
        head = _all_batches(first, stop)
        state = json.loads(json.dumps(first.state()))
        assert state["seed"] == 11 and (state["epoch"], state["batch"]) == divmod(stop, 7)
        resumed = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), **kw, state=state)
        _assert_batches_equal(head + _all_batches(resumed, 21 - stop), reference)
    # iterating whole epochs with `for`, interrupted and restored with restore()
    loader = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), **kw)
    epoch0 = list(loader)
    partial = []
    for i, batch in enumerate(loader):
        partial.append(batch)
        if i == 2:
            break
    state = loader.state()
    assert (state["epoch"], state["batch"]) == (1, 3)
    other = Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), **{**kw, "seed": 0})
    other.restore(state)  # adopts the state's seed
    rest = list(other)
    assert len(epoch0) == 7 and len(rest) == 4
    _assert_batches_equal(epoch0 + partial + rest + list(other), reference)
    with pytest.raises(ValueError, match="other examples or with other batching"):
        Loader(dataset, PromptFormat(fmt.tokenizer, K, VOCAB), **{**kw, "batch_size": 2}, state=state)
    with pytest.raises(ValueError, match="not a loader state"):
        loader.restore({"epoch": 0})


def test_split_by_conversation(dataset, fmt):
    train, held = split(dataset, eval_fraction=0.4, seed=3)
    assert len(held.conversations) == 2 and len(train.conversations) == 3
    assert set(train.conversations).isdisjoint(held.conversations)
    assert set(train.conversations) | set(held.conversations) == set(dataset.conversations)
    assert len(train) + len(held) == len(dataset)
    for part in (train, held):
        for conv, members in part.conversations.items():
            assert len(members) == 4 and [part[i].turn for i in members] == [0, 1, 2, 3]
    again_train, again_held = split(dataset, eval_fraction=0.4, seed=3)
    assert set(again_held.conversations) == set(held.conversations)
    assert any(set(split(dataset, eval_fraction=0.4, seed=s)[1].conversations) != set(held.conversations)
               for s in range(4, 10))
    assert set(split(dataset, eval_conversations=1, seed=0)[1].conversations).issubset(dataset.conversations)
    t, h = split(dataset, eval_conversations=["c0001"])
    assert set(h.conversations) == {"c0001"} and "c0001" not in t.conversations
    loader = Loader(held, fmt, batch_size=2, max_rows=2048, shuffle=False)
    batches = list(loader)
    assert {int(i) for b in batches for i in b["ids"] if i >= 0} == {e.id for e in held.entries}
    for ex in loader.examples:  # context comes from the same held-out conversation
        assert all(held[i].conversation == held[ex.target].conversation for i in ex.context)
    with pytest.raises(ValueError):
        split(dataset, eval_fraction=1.0)
    with pytest.raises(ValueError):
        split(dataset, eval_conversations=list(dataset.conversations))


def test_other_tokenizer_retokenises(dataset):
    other_tok = byte_tokenizer()
    other_tok.add_special_tokens(["<|extra|>"])  # another fingerprint, so the stored ids are not used
    other = PromptFormat(other_tok, K, VOCAB)
    loader = Loader(dataset, other, batch_size=2, max_rows=2048, shuffle=False)
    tokens, mask, targets = loader.example_rows(0)
    expected = _expected(dataset, other, loader.examples[0].target, 2048, 16)
    np.testing.assert_array_equal(tokens, expected[0])
    np.testing.assert_array_equal(mask, expected[1])
    np.testing.assert_array_equal(targets, expected[2])
    with pytest.raises(ValueError, match="audio_vocab_size"):
        Loader(dataset, PromptFormat(other_tok, K, 1000), batch_size=2)


def test_open_errors(tmp_path, prepared):
    with pytest.raises(DatasetError, match="no prepared dataset"):
        Dataset.open(tmp_path)
    out = _copy(prepared, tmp_path)
    (out / "shard-00002.npz").unlink()
    with pytest.raises(DatasetError, match="lacks shard-00002.npz"):
        Dataset.open(out)


def test_corpus_audio_is_resampled_speech(dataset):
    e = dataset[0]
    assert sf.info(e.audio).samplerate == 22050
    assert e.samples == pytest.approx(sf.info(e.audio).frames * 24000 / 22050, abs=2)


@pytest.mark.parametrize("max_rows, turns", [(2048, 16), (160, 16), (2048, 1)])
def test_loader_rows_equal_the_servers_prompt_rows(dataset, fmt, tmp_path, max_rows, turns):
    """The same conversation stored in the server's history gives the server's ConversationManager prompt exactly
    the rows the training loader puts before the target's audio (one PromptFormat owns both)."""
    from csm_jax.conversation import ConversationManager, SQLiteStore

    fmt = fmt.with_context(turns)
    loader = Loader(dataset, fmt, batch_size=2, max_rows=max_rows, shuffle=False)
    store = SQLiteStore(tmp_path / f"history_{max_rows}_{turns}.db")
    manager = ConversationManager(store, fmt, max_seq_len=max_rows)
    checked = 0
    for k, ex in enumerate(loader.examples):
        target = dataset[ex.target]
        earlier = [i for i in dataset.conversations[target.conversation] if dataset[i].turn < target.turn]
        if not earlier:
            continue
        cid, _ = manager.start()
        for i in earlier:
            manager.add_turn(cid, dataset[i].speaker, dataset[i].text, dataset.codes(i).astype(np.int32), "user")
        prompt = manager.build_prompt(cid, target.text, target.speaker, max_frames=target.frames + 1)
        tokens, mask, targets = loader.example_rows(k)
        assert prompt.context_turns == len(ex.context)
        np.testing.assert_array_equal(prompt.tokens, tokens[: prompt.rows])
        np.testing.assert_array_equal(prompt.mask, mask[: prompt.rows])
        assert not targets[: prompt.rows].any() and targets[prompt.rows:].all()
        checked += 1
    assert checked >= 5
    store.close()


def test_speakers_as_conversation_roles(corpus, codec, fmt, tmp_path):
    """speakers="roles": ids become 0, 1, ... per conversation in order of first appearance (CSM's convention), the
    text ids say so, and the manifest id is kept."""
    from csm_jax.data.prepare import conversation_roles

    utts = read_manifest(corpus)
    roles = conversation_roles(utts)
    for conv in {u.conversation for u in utts}:
        turns = sorted((u for u in roles if u.conversation == conv), key=lambda u: u.turn)
        first = list(dict.fromkeys(u.speaker for u in turns))
        assert first == list(range(len(first)))
        assert all(u.extra["voice_id"] == v.speaker for u, v in zip(roles, utts))
    out = tmp_path / "roles"
    _prep(corpus, out, codec, fmt, speakers="roles")
    ds = Dataset.open(out)
    for i, e in enumerate(ds.entries):
        np.testing.assert_array_equal(ds.text_ids(i), fmt.text_ids(e.text, e.speaker))
        assert e.speaker == next(u.speaker for u in roles if (u.conversation, u.turn) == (e.conversation, e.turn))
    with pytest.raises(PrepareError, match="speakers"):
        _prep(corpus, tmp_path / "bad", codec, fmt, speakers="voices")


def test_prompt_examples_add_each_turn_after_only_its_speakers_previous_turn(dataset, fmt):
    """prompt_examples: every regular example stays; each utterance with an earlier turn of its own speaker gains
    an example whose one context turn is that turn (the rows: that turn's rows, then the target's)."""
    pf = PromptFormat(fmt.tokenizer, K, VOCAB, None, 3)
    base = Loader(dataset, pf, batch_size=3, max_rows=400, seed=5)
    extra = Loader(dataset, pf, batch_size=3, max_rows=400, seed=5, prompt_examples=True)
    regular = {(ex.target, ex.context): k for k, ex in enumerate(base.examples)}
    assert set(regular) <= {(ex.target, ex.context) for ex in extra.examples}
    added = [k for k, ex in enumerate(extra.examples) if (ex.target, ex.context) not in regular]
    assert added
    own = {target: base.example_rows(k) for (target, _), k in regular.items()}  # one regular example each
    for k in added:
        ex = extra.examples[k]
        (c,) = ex.context
        t, prev = dataset.entries[ex.target], dataset.entries[c]
        assert prev.conversation == t.conversation and prev.speaker == t.speaker and prev.turn < t.turn
        assert not any(e.conversation == t.conversation and e.speaker == t.speaker and prev.turn < e.turn < t.turn
                       for e in dataset.entries)
        tokens, mask, _ = extra.example_rows(k)
        rows_t, rows_c = base._turn_rows(ex.target), base._turn_rows(c)
        assert len(tokens) == rows_t + rows_c
        np.testing.assert_array_equal(tokens[:rows_c], own[c][0][-rows_c:])  # the turn as it is anywhere else
        np.testing.assert_array_equal(tokens[rows_c:], own[ex.target][0][-rows_t:])
        np.testing.assert_array_equal(mask[rows_c:], own[ex.target][1][-rows_t:])
    assert extra.state()["fingerprint"] != base.state()["fingerprint"]
    with pytest.raises(ValueError, match="prompt_examples"):
        Loader(dataset, pf, batch_size=3, max_rows=400, prompt_examples="yes")
