"""Codec training: the EMA split RVQ agrees with the inference quantizer, the losses behave, a tiny codec learns,
and the Hydra recipe (train/train_codec.py) trains, evaluates, exports, resumes exactly after kill -9 and rejects
bad inputs with clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recipe_outputs import losses, result
from xla_env import subprocess_env

from csm_jax import backend, load_audio
from csm_jax.codec.config import MimiConfig
from csm_jax.codec.mimi import Mimi
from csm_jax.training.codec import (
    AudioBank,
    CodecOptimConfig,
    CodecProgram,
    CodecTrainConfig,
    RVQConfig,
    init_ema,
    prepare_audio,
    quantize,
    update_ema,
    with_codebooks,
)
from csm_jax.training.codec import losses as L
from csm_jax.training.mesh import MeshConfig, make_train_mesh

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
ENV = subprocess_env()  # one CPU device, as a user's run
TINY = MimiConfig(hidden_size=64, num_filters=8, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=16,
                  intermediate_size=128, codebook_dim=32, codebook_size=256, num_quantizers=4, upsample_groups=64)
# One training config for the in-process tests (variants differ only in stages), so they share compiled programs.
FAST = CodecTrainConfig(max_steps=30, batch_size=4, segment_frames=6, mesh=MeshConfig(data=4),
                        optim=CodecOptimConfig(learning_rate=3e-3, warmup_steps=5))


def _latent(cfg: MimiConfig, seed: int = 0, clip: str = "speech_3s.wav") -> tuple[dict[str, Any], jax.Array]:
    audio = jnp.asarray(load_audio(DATA / clip)[None, : 12 * cfg.frame_size])
    model = Mimi(cfg)  # compiled: one program each instead of hundreds of op-by-op ones
    params = backend.jit_init(model.init)(jax.random.key(seed), audio[:, : cfg.frame_size])["params"]
    return params, jax.jit(lambda p, a: model.apply({"params": p}, a, method=Mimi.encode_latent))(params, audio)


def _trained_ema(params: dict[str, Any], latent: jax.Array, cfg: MimiConfig, steps: int = 3) -> dict[str, Any]:
    ema = init_ema(cfg)
    rvq = RVQConfig(dropout_prob=0.0)
    for i in range(steps):
        full = with_codebooks(params, ema)
        _, aux = quantize(full["quantizer"], ema, latent, cfg, rvq, jax.random.key(i))
        ema, _ = update_ema(ema, aux, rvq)
    return ema


def test_training_rvq_matches_the_inference_quantizer() -> None:
    """With all levels kept, the training RVQ's codes are the inference encoder's codes on the same latent, and its
    output is the inference decoder's sum of centroids (the EMA codebooks are what inference uses)."""
    params, latent = _latent(TINY)
    ema = _trained_ema(params, latent, TINY)
    full = with_codebooks(params, ema)
    out, aux = quantize(full["quantizer"], ema, latent, TINY, RVQConfig(), jax.random.key(9),
                        num_acoustic=TINY.num_quantizers - 1)
    module = Mimi(TINY)
    codes = module.apply({"params": full}, latent, TINY.num_quantizers,
                         method=lambda m, x, n: m.quantizer.encode(x, n))
    np.testing.assert_array_equal(np.asarray(aux["codes"]), np.asarray(codes))
    decoded = module.apply({"params": full}, codes, method=lambda m, c: m.quantizer.decode(c))
    np.testing.assert_allclose(np.asarray(out), np.asarray(decoded), atol=1e-4)


def test_ema_statistics_dead_codes_and_dropout() -> None:
    params, latent = _latent(TINY)
    ema = _trained_ema(params, latent, TINY, steps=1)
    usage = np.asarray(ema["acoustic"]["cluster_usage"])
    assert bool(ema["initialized"]) and usage.shape == (TINY.num_quantizers - 1, TINY.codebook_size)
    # EMA sums over usages: the centroid form of the official checkpoints.
    centroids = np.asarray(ema["acoustic"]["embed_sum"]) / np.maximum(usage, 1e-5)[..., None]
    np.testing.assert_allclose(np.asarray(with_codebooks(params, ema)["quantizer"]["acoustic"]["codebooks"]),
                               centroids, rtol=1e-6)
    # A code nobody uses decays below the threshold and is replaced by a vector from the batch.
    stale = jax.tree.map(lambda x: x, ema)
    stale["acoustic"] = dict(stale["acoustic"], cluster_usage=stale["acoustic"]["cluster_usage"].at[0, 5].set(0.0))
    full = with_codebooks(params, stale)
    _, aux = quantize(full["quantizer"], stale, latent, TINY, RVQConfig(), jax.random.key(1))
    new, metrics = update_ema(stale, aux, RVQConfig())
    assert float(metrics["acoustic_replaced"][0]) >= 1
    assert float(new["acoustic"]["cluster_usage"][0, 5]) > 0
    # Quantizer dropout: a sequence keeping n acoustic levels gets the sum of exactly those levels (on other
    # speech than the codebooks were drawn from, so every level has a residual left to quantize).
    other = Mimi(TINY).apply({"params": params}, jnp.asarray(load_audio(DATA / "speech_14s.wav")[None, 40_000:63_040]),
                             method=Mimi.encode_latent)
    out1, aux1 = quantize(full["quantizer"], stale, other, TINY, RVQConfig(), jax.random.key(2), num_acoustic=1)
    out3, _ = quantize(full["quantizer"], stale, other, TINY, RVQConfig(), jax.random.key(2), num_acoustic=3)
    decode = lambda c: Mimi(TINY).apply({"params": full}, c, method=lambda m, x: m.quantizer.decode(x))  # noqa: E731
    np.testing.assert_allclose(np.asarray(out1), np.asarray(decode(aux1["codes"][..., :2])), atol=1e-4)
    assert float(jnp.abs(out1 - out3).max()) > 1e-3


def test_losses_are_zero_on_identical_audio_and_grow_with_distortion() -> None:
    x = jnp.asarray(load_audio(DATA / "speech_1s.wav")[None])
    noise = jnp.asarray(np.random.default_rng(0).normal(size=x.shape).astype(np.float32))
    assert float(L.mel_loss(x, x, 24_000)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.stft_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    small, large = x + 0.003 * noise, x + 0.03 * noise
    assert 0 < float(L.mel_loss(x, small, 24_000)) < float(L.mel_loss(x, large, 24_000))
    assert 0 < float(L.stft_loss(x, small)) < float(L.stft_loss(x, large))
    # Mel filters: unit area, centred on increasing frequencies, covering the band.
    fb = L.mel_filterbank(24_000, 1024, 40)
    assert fb.shape == (513, 40) and (fb >= 0).all() and (np.diff(fb.argmax(0)) >= 0).all()
    logits = [jnp.array([2.0, -2.0])]
    assert float(L.hinge_discriminator(logits, [-x for x in logits])) == pytest.approx(3.0)  # (0 + 3) / 2 twice
    assert float(L.hinge_generator([jnp.array([1.0, 3.0])])) == 0.0


def _harmonic(f0: np.ndarray, sample_rate: int = 24_000) -> np.ndarray:
    """A 14-harmonic tone float32 [N] following the F0 track f0 [N] in Hz (a stand-in for a voiced vowel)."""
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    return (0.1 * sum(np.sin(k * phase) / k for k in range(1, 15))).astype(np.float32)


def test_periodicity_loss_finds_the_reference_pitch() -> None:
    """Zero on the reference itself; small for a 3 % detune, large for a wrong pitch, an octave either way or
    noise; nothing on unvoiced frames; and its gradient moves noise towards the reference's period."""
    from csm_jax.evaluation.pitch import f0_batch

    t = np.arange(24_000) / 24_000
    glide = 110.0 * (1 + 0.2 * np.sin(2 * np.pi * 1.5 * t))
    ref = jnp.asarray(_harmonic(glide)[None])
    f0 = jnp.asarray(f0_batch(np.asarray(ref)))
    times = 0.025 + 0.01 * np.arange(96)  # Praat's grid: 10 ms apart, centred in the 1 s
    tracked = np.asarray(f0)[0]
    assert f0.shape == (1, 96) and (tracked > 0).mean() > 0.9
    assert np.median(np.abs(tracked / np.interp(times, t, glide) - 1)[tracked > 0]) < 0.02
    loss = lambda est: float(L.periodicity_loss(ref, jnp.asarray(est)[None], f0, 24_000))  # noqa: E731
    noise = np.random.default_rng(0).normal(0, 0.1, t.shape).astype(np.float32)
    assert loss(ref[0]) == pytest.approx(0.0, abs=1e-6)
    near, off = loss(_harmonic(glide * 1.03)), loss(_harmonic(glide * 1.25))
    assert near < 0.2 < 1.0 < off
    for wrong in (_harmonic(glide * 2), _harmonic(glide / 2), noise):
        assert loss(wrong) > 1.0
    assert float(L.periodicity_loss(ref, jnp.asarray(noise)[None], jnp.zeros_like(f0), 24_000)) == 0.0
    grad = jax.grad(lambda e: L.periodicity_loss(ref, e, f0, 24_000))(jnp.asarray(noise)[None])
    assert loss(noise - 0.05 * np.asarray(grad)[0] / float(jnp.abs(grad).max())) < loss(noise)


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> AudioBank:
    """Real speech (the test clips as utterances of three conversations) prepared into an audio bank."""
    root = tmp_path_factory.mktemp("codec_audio")
    lines = [{"audio": str(DATA / name), "text": "hello there", "speaker": i % 2, "conversation": f"c{i % 3}",
              "turn": i // 3} for i, name in enumerate(["speech_1s.wav", "speech_3s.wav", "speech_14s.wav",
                                                         "speech_stereo_44k.wav"])]
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = prepare_audio(root / "manifest.jsonl", root / "prepared", eval_conversations=1, progress=False)
    return AudioBank.open(out, "train")


def test_audio_bank_crops_are_deterministic_and_cover_the_audio(bank: AudioBank) -> None:
    a, b = bank.crops(7, 4, 3840, seed=1), bank.crops(7, 4, 3840, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, bank.crops(8, 4, 3840, seed=1))
    assert a.dtype == np.float32 and a.shape == (4, 3840) and 0.01 < np.abs(a).max() <= 1.0


def test_a_tiny_codec_learns_to_reconstruct(bank: AudioBank) -> None:
    program = CodecProgram(TINY, FAST, make_train_mesh(FAST.mesh))
    state = program.init_state(0)
    audio = bank.crops(0, 4, program.segment)
    mels = []
    for step in range(30):
        state, metrics = program.train_step(state, step, audio)
        mels.append(float(metrics["mel"]))
    assert np.mean(mels[-3:]) < 0.75 * mels[0], mels
    codec = program.codec(state)
    recon = np.asarray(codec.decode(codec.encode(audio)))
    assert recon.shape == audio.shape and np.isfinite(recon).all()


def test_the_pitch_loss_trains_on_the_batchs_f0(bank: AudioBank) -> None:
    from csm_jax.evaluation.pitch import f0_batch

    cfg = dataclasses.replace(FAST, losses={"pitch": 10.0})
    program = CodecProgram(TINY, cfg, make_train_mesh(cfg.mesh))
    state = program.init_state(0)
    audio = bank.crops(0, 4, program.segment)
    with pytest.raises(ValueError, match="needs the batch's F0"):
        program.train_step(state, 0, audio)
    _, metrics = program.train_step(state, 0, audio, f0=f0_batch(audio))
    assert 0.0 < float(metrics["pitch"]) <= 2.0  # per voiced frame, |difference| at two lags of correlations
    assert np.isfinite(float(metrics["loss"]))


# the Hydra recipe --------------------------------------------------------------------------------------------
def command(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train" / "train_codec.py"), "codec=tiny", "data=espeak_tiny",
            "codec_train=tiny", "data.eval_conversations=1", *overrides]


def run(*overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(*overrides), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        raise AssertionError(f"train_codec failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    root = tmp_path_factory.mktemp("codec_recipe")
    overrides = (f"paths.data={root / 'data'}", f"paths.runs={root / 'runs'}")
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "make_corpus.py"), "data=espeak_tiny",
                           "data.corpus.num_conversations=4", "data.corpus.turns=2", *overrides], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return overrides


LOG_EVERY_STEP = ("codec_train.log_every=1",)  # every step's loss in metrics.jsonl, for the resume comparison


@pytest.fixture(scope="module")
def reference_run(corpus: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted 12-step recipe run (adversarial from step 6, evaluated at 6 and 12) -> its summary."""
    return result(run(*corpus, *LOG_EVERY_STEP, f"workdir={tmp_path_factory.mktemp('codec_ref')}"))


def test_recipe_trains_evaluates_and_exports_a_codec_transformers_reads(reference_run: dict[str, Any]) -> None:
    import torch
    from transformers import MimiModel

    from csm_jax import load_codec

    summary = reference_run
    assert summary["step"] == 12 and not summary["resumed"]
    assert {"eval/mel_distance", "eval/si_snr", "eval/f0_rel_error"} <= set(summary["eval"])
    export = Path(summary["export"])
    codec = load_codec(export / "codec")
    audio = load_audio(DATA / "speech_3s.wav")[None]
    ours = np.asarray(codec.encode(audio))
    model = MimiModel.from_pretrained(export / "transformers").eval()
    with torch.no_grad():
        theirs = model.encode(torch.from_numpy(audio)[:, None], num_quantizers=8).audio_codes.numpy()
        decoded = model.decode(torch.from_numpy(ours).long()).audio_values.numpy()[:, 0]
    # After 12 steps the deep residual levels hold near-duplicate codewords, so float rounding may flip a few
    # near-tied choices there; the first levels and the decoder must agree exactly.
    np.testing.assert_array_equal(ours[:, :4], theirs[:, :4])
    assert (ours == theirs).mean() >= 0.9
    np.testing.assert_allclose(decoded, np.asarray(codec.decode(ours)), atol=1e-4)


def test_evaluate_codec_scores_the_export_as_the_run_did_and_per_voice(corpus: tuple[str, ...],
                                                                      reference_run: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    """train/evaluate_codec.py on the run's export, with the in-run evaluation's utterances and cut, gives that
    evaluation's numbers at the exported step, and breaks them down by voice."""
    workdir = Path(reference_run["workdir"])
    out = tmp_path / "codec_eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "evaluate_codec.py"), *command(*corpus)[2:],
                           f"workdir={workdir}", "evaluate_codec.utterances=2", "evaluate_codec.max_seconds=4.0",
                           "evaluate_codec.asr=false", f"evaluate_codec.out={out}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = result(proc)
    assert json.loads(out.read_text()) == report
    assert report["codec"] == str(Path(reference_run["export"]) / "codec") and report["utterances"] == 2
    step = int((Path(reference_run["export"]) / "STEP").read_text())
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    in_run = next(r for r in records if r["step"] == step and "eval/mel_distance" in r)
    for key in ("mel_distance", "si_snr", "f0_rel_error", "voicing_agreement"):
        np.testing.assert_allclose(report[key], in_run[f"eval/{key}"], rtol=1e-4, err_msg=key)
    speakers = report["speakers"]
    assert sum(v["utterances"] for v in speakers.values()) == 2
    assert all(set(v) == {"utterances", "f0_hz", "f0_rel_error", "f0_unscored", "voicing_agreement"}
               for v in speakers.values())


def test_kill_9_after_a_checkpoint_resumes_exactly(corpus: tuple[str, ...], reference_run: dict[str, Any],
                                                  tmp_path: Path) -> None:
    settings = LOG_EVERY_STEP
    reference = losses(Path(reference_run["workdir"]))
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(command(*corpus, *settings, f"workdir={workdir}"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    found: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None and not found:
        found = [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit() and int(p.name) >= 6]
        time.sleep(0.05)
    assert found, "no checkpoint at step >= 6 appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(losses(workdir)) < 12  # really interrupted
    resumed = result(run(*corpus, *settings, f"workdir={workdir}"))
    assert resumed["resumed"] and resumed["start_step"] >= 6 and resumed["step"] == 12
    after = losses(workdir)
    for step in range(resumed["start_step"] + 1, 13):
        assert after[step] == reference[step], (step, after[step], reference[step])


def test_a_new_run_goes_on_from_a_runs_latest_weights_and_discriminator(reference_run: dict[str, Any]) -> None:
    """codec_train.init = a run's directory: its latest weights, codebooks and discriminator, fresh optimisers;
    a run with another discriminator is refused by name."""
    from csm_jax.configs import from_dict
    from csm_jax.training.codec.trainer import ConfigMismatch, restore_codec, start_from

    workdir = Path(reference_run["workdir"])
    from csm_jax.training.checkpointing import Checkpointer

    with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        meta = ckpt.meta(12)
    codec_cfg = MimiConfig.from_dict(meta["codec_config"])
    here = {"mesh": dataclasses.asdict(FAST.mesh)}  # this process's devices, not the recipe's
    cfg = from_dict(CodecTrainConfig, meta["config"] | here | {"losses": {"pitch": 10.0},
                                                               "optim": {"learning_rate": 1e-4}})
    saved, program, step = restore_codec(workdir, codec_cfg, cfg, "latest")
    fresh = program.init_state(1)
    state = start_from(program, fresh, workdir)
    assert step == 12 and int(state.step) == 0
    for part in ("params", "ema", "disc_params"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, part), getattr(saved, part))
    moments = lambda s: jax.tree.leaves(s.opt_state) + jax.tree.leaves(s.disc_opt_state)  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, moments(state), moments(fresh))
    other = from_dict(CodecTrainConfig, meta["config"] | here | {"discriminator": meta["config"]["discriminator"]
                                                                 | {"filters": 8}})
    program = CodecProgram(codec_cfg, other, make_train_mesh(other.mesh))
    with pytest.raises(ConfigMismatch, match="discriminator.filters: 4 -> 8"):  # refused before any state is made
        start_from(program, fresh, workdir)


@pytest.mark.parametrize("case", ["missing_manifest", "missing_audio", "corrupt_audio", "bad_strides",
                                  "unknown_loss", "changed_config"])
def test_bad_inputs_fail_with_clear_errors(case: str, corpus: tuple[str, ...], tmp_path: Path,
                                          request: pytest.FixtureRequest) -> None:
    manifest = tmp_path / "manifest.jsonl"
    overrides = [*corpus, f"workdir={tmp_path / 'run'}", f"codec_audio={tmp_path / 'audio'}"]
    if case == "missing_manifest":
        overrides.append(f"data.manifest={manifest}")
        expect = "manifest.jsonl"
    elif case in ("missing_audio", "corrupt_audio"):
        (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wave file")
        lines = [{"audio": "nope.wav" if case == "missing_audio" else "bad.wav", "text": "hi", "speaker": 0,
                  "conversation": f"c{i}", "turn": 0} for i in range(2)]
        manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
        overrides.append(f"data.manifest={manifest}")
        expect = "nope.wav" if case == "missing_audio" else "bad.wav"
    elif case == "bad_strides":
        overrides.append("+codec.config.ratios=[8,6,5,3]")
        expect = "not a multiple of 12.5 Hz"
    elif case == "unknown_loss":
        overrides.append("+codec_train.losses.bogus=1.0")
        expect = "unknown codec loss name(s) ['bogus']"
    else:  # the reference run's checkpoints, resumed with another learning rate
        shutil.copytree(request.getfixturevalue("reference_run")["workdir"], tmp_path / "run")
        overrides += [*LOG_EVERY_STEP, "codec_train.optim.learning_rate=1e-3"]
        expect = "optim.learning_rate: 0.0006 -> 0.001"
    proc = run(*overrides, check=False)
    assert proc.returncode != 0
    assert expect in proc.stdout + proc.stderr, (proc.stdout[-2000:], proc.stderr[-2000:])


def test_frozen_codes_keep_encoder_and_codebooks_while_the_decoder_trains(bank: AudioBank) -> None:
    cfg = dataclasses.replace(FAST, freeze_codes_at=3)
    program = CodecProgram(TINY, cfg, make_train_mesh(cfg.mesh))
    state = program.init_state(0)
    audio = bank.crops(0, 4, program.segment)
    snapshots = {}
    for step in range(6):
        state, _ = program.train_step(state, step, bank.crops(step, 4, program.segment))
        snapshots[step + 1] = jax.device_get(state)
    before, after = snapshots[3], snapshots[6]
    for name in ("encoder", "encoder_transformer", "downsample"):
        jax.tree.map(np.testing.assert_array_equal, before.params["mimi"][name], after.params["mimi"][name])
    jax.tree.map(np.testing.assert_array_equal, before.ema, after.ema)
    codes = [np.asarray(program.codec(s).encode(audio)) for s in (before, after)]
    np.testing.assert_array_equal(*codes)
    for name in ("decoder", "decoder_transformer", "upsample"):  # the decoder side still trains
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before.params["mimi"][name],
                                             after.params["mimi"][name]))
        assert any(moved), name
    assert not np.array_equal(np.asarray(snapshots[2].ema["acoustic"]["embed_sum"]),
                              np.asarray(before.ema["acoustic"]["embed_sum"]))  # EMA moved before the freeze


def test_stages_not_yet_reached_may_move_on_resume() -> None:
    from csm_jax.training.codec.trainer import ConfigMismatch, check_resume

    saved = CodecTrainConfig(max_steps=100, adversarial_start=50, freeze_codes_at=None)
    meta = {"step": 40, "config": saved.to_dict(), "codec_config": TINY.to_dict()}
    check_resume(meta, CodecTrainConfig(max_steps=200, adversarial_start=60, freeze_codes_at=45), TINY)
    with pytest.raises(ConfigMismatch, match="freeze_codes_at: None -> 30"):
        check_resume(meta, CodecTrainConfig(max_steps=100, adversarial_start=50, freeze_codes_at=30), TINY)
    with pytest.raises(ConfigMismatch, match="adversarial_start: 50 -> 20"):
        check_resume(meta, CodecTrainConfig(max_steps=100, adversarial_start=20), TINY)


def test_a_run_starts_from_a_codec_and_trains_its_decoder_on_fixed_codes(bank: AudioBank, tmp_path: Path) -> None:
    """codec_train.init: the weights and codebooks of a saved codec (here another seed's initial one), then
    decoder-only training with the multi-period discriminator: the codes stay those of the source codec."""
    from csm_jax import load_codec
    from csm_jax.training.codec.discriminator import DiscriminatorConfig

    program = CodecProgram(TINY, FAST, make_train_mesh(FAST.mesh))
    program.codec(program.init_state(0)).save(tmp_path / "source")
    source = load_codec(tmp_path / "source")

    cfg = CodecTrainConfig(max_steps=2, batch_size=4, segment_frames=6, mesh=MeshConfig(data=4), adversarial_start=0,
                           freeze_codes_at=0, init=str(tmp_path / "source"),
                           discriminator=DiscriminatorConfig(windows=(512,), filters=4, batch=2, periods=(2, 3)))
    tuned = CodecProgram(TINY, cfg, make_train_mesh(cfg.mesh))
    start = tuned.start_from(tuned.init_state(1), source)
    audio = bank.crops(9, 4, tuned.segment)
    np.testing.assert_array_equal(np.asarray(tuned.codec(start).encode(audio)), np.asarray(source.encode(audio)))
    assert {"period_2", "period_3"} <= set(start.disc_params)
    after = start
    for step in range(2):
        after, metrics = tuned.train_step(after, step, bank.crops(step, 4, tuned.segment))
        assert np.isfinite(float(metrics["disc_loss"])) and np.isfinite(float(metrics["feature"]))
    np.testing.assert_array_equal(np.asarray(tuned.codec(after).encode(audio)), np.asarray(source.encode(audio)))
    assert not np.array_equal(np.asarray(tuned.codec(after).decode(source.encode(audio))),
                              np.asarray(source.decode(source.encode(audio))))
    with pytest.raises(ValueError, match="architecture differs from codec.config in .*num_filters"):
        CodecProgram(TINY.replace(num_filters=4), cfg, make_train_mesh(cfg.mesh)).start_from(start, source)
