"""The codec command line, `python -m csm_jax.codec {encode,decode,roundtrip,convert}`.

Commands run in-process through `csm_jax.codec.__main__.main(argv)` on the TINY random-weight reference
(transformers `save_pretrained` directory). Codes and audio are checked against transformers' `MimiModel`, an
oracle independent of csm_jax. One test runs the real entry point in a subprocess; one runs `--checkpoint random`
(full size, slow). Every failure must exit with status 2, print `error: ...` naming the problem, not raise, and
write no output.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from mimi_fixtures import DATA, FRAME, MimiReference, clip, tiny_ref  # noqa: F401  (fixtures)

import csm_jax
from csm_jax.codec.__main__ import main

SPEECH = DATA / "speech_3s.wav"  # 76_916 samples: not a whole number of frames, so trimming is exercised
SAMPLE_RATE = 24_000
# csm_jax vs transformers decoded audio (1e-4, as in test_codec_parity) plus PCM16 rounding (<= 1/65536) and the
# 32767-vs-32768 scale difference between writing and reading (<= 1/32768 at full scale)
PCM16_ATOL = 1e-4 + 2 / 32768


# --------------------------------------------------------------------------------------------- helpers ---
def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """Run `main(argv)` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_wav(path: Path) -> np.ndarray:
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16"), info
    audio, rate = sf.read(str(path), dtype="float32")
    assert rate == SAMPLE_RATE and audio.ndim == 1
    return audio


def ref_roundtrip(ref: MimiReference, audio: np.ndarray) -> np.ndarray:
    """transformers decode(encode(audio)) trimmed to the input length, float32 [N]."""
    return ref.decode(ref.encode(audio[None]))[0][: len(audio)]


def assert_audio_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.abs(want).max() > 0.1, "reference audio is near-silent: the comparison would prove little"
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert diff <= PCM16_ATOL, f"max |cli - transformers| = {diff:.3g} > {PCM16_ATOL:.3g}"


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `path`: relative name -> (size, mtime_ns, content)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def speech_codes(tiny_ref: MimiReference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """speech_3s.wav encoded by the CLI with the tiny checkpoint (shared by the decode tests)."""
    path = tmp_path_factory.mktemp("cli_codes") / "speech.codes.npz"
    assert main(["encode", str(SPEECH), str(path), "--checkpoint", str(tiny_ref.hf_dir)]) == 0
    return path


# ---------------------------------------------------------------------------------------------- encode ---
def test_encode_writes_reference_codes(
    tiny_ref: MimiReference, speech_codes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audio = clip("speech_3s")
    n = len(audio)
    with np.load(speech_codes) as f:
        assert {"codes", "num_samples", "sample_rate", "frame_rate"} <= set(f.files), f.files
        codes, num_samples = f["codes"], int(f["num_samples"])
        sample_rate, frame_rate = int(f["sample_rate"]), float(f["frame_rate"])
    k = tiny_ref.config.num_quantizers
    assert codes.dtype == np.int16
    assert codes.shape == (k, math.ceil(n / FRAME)) == (4, 41)
    assert (num_samples, sample_rate, frame_rate) == (n, SAMPLE_RATE, 12.5)
    want = tiny_ref.encode(audio[None])[0]
    np.testing.assert_array_equal(codes, want, err_msg="CLI codes differ from transformers MimiModel.encode")
    assert len(np.unique(codes)) > 4, "degenerate codes"


def test_encode_num_codebooks(tiny_ref: MimiReference, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k2.npz"
    rc, stdout, err = cli(capsys, "encode", SPEECH, out, "--checkpoint", tiny_ref.hf_dir, "--num-codebooks", 2)
    assert rc == 0, err
    assert str(out) in stdout and "[2, 41]" in stdout
    with np.load(out) as f:
        codes = f["codes"]
    assert codes.dtype == np.int16 and codes.shape == (2, 41)
    np.testing.assert_array_equal(codes, tiny_ref.encode(clip("speech_3s")[None], num_quantizers=2)[0])


def test_checkpoint_defaults_to_env(
    tiny_ref: MimiReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CSM_JAX_MIMI", str(tiny_ref.hf_dir))
    out = tmp_path / "env.npz"
    rc, _, err = cli(capsys, "encode", SPEECH, out)
    assert rc == 0, err
    with np.load(out) as f:
        np.testing.assert_array_equal(f["codes"], tiny_ref.encode(clip("speech_3s")[None])[0])


def test_encode_writes_exactly_the_named_file(
    tiny_ref: MimiReference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output name without `.npz` must not be silently changed (np.savez appends `.npz`): either the file is
    written where asked (and reported there), or the command refuses with status 2 and writes nothing."""
    out = tmp_path / "speech.codes"
    rc, stdout, err = cli(capsys, "encode", SPEECH, out, "--checkpoint", tiny_ref.hf_dir)
    written = files_under(tmp_path)
    if rc == 0:
        assert written == {out.name}, f"asked for {out.name}, wrote {sorted(written)} (reported: {stdout.strip()})"
        with np.load(out) as f:
            np.testing.assert_array_equal(f["codes"], tiny_ref.encode(clip("speech_3s")[None])[0])
    else:
        assert rc == 2 and err.startswith("error: ") and written == set(), (rc, err, written)


# ---------------------------------------------------------------------------------------------- decode ---
def test_decode_matches_transformers(
    tiny_ref: MimiReference, speech_codes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "speech.decoded.wav"
    rc, stdout, err = cli(capsys, "decode", speech_codes, out, "--checkpoint", tiny_ref.hf_dir)
    assert rc == 0, err
    assert str(out) in stdout
    with np.load(speech_codes) as f:
        codes, n = f["codes"], int(f["num_samples"])
    got = read_wav(out)
    assert len(got) == n == len(clip("speech_3s"))  # trimmed to the input length, not 41 * 1920
    want = tiny_ref.decode(codes[None].astype(np.int64))[0][:n]
    assert_audio_close(got, want)


def test_decode_foreign_codes_without_num_samples(
    tiny_ref: MimiReference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A codes file with only `codes` (here transformers' own int64 codes, K=3) decodes to all 1920 * T samples."""
    codes = tiny_ref.encode(clip("speech_1s")[None], num_quantizers=3)[0]  # int64 [3, 15]
    src, out = tmp_path / "hf.npz", tmp_path / "hf.wav"
    np.savez(src, codes=codes)
    rc, _, err = cli(capsys, "decode", src, out, "--checkpoint", tiny_ref.hf_dir)
    assert rc == 0, err
    got = read_wav(out)
    assert len(got) == FRAME * codes.shape[-1]
    assert_audio_close(got, tiny_ref.decode(codes[None])[0])


# ------------------------------------------------------------------------------------------- roundtrip ---
def test_roundtrip_matches_transformers(
    tiny_ref: MimiReference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "speech.mimi.wav"
    rc, stdout, err = cli(capsys, "roundtrip", SPEECH, out, "--checkpoint", tiny_ref.hf_dir)
    assert rc == 0, err
    assert str(out) in stdout
    audio = clip("speech_3s")
    got = read_wav(out)
    assert len(got) == len(audio)
    assert_audio_close(got, ref_roundtrip(tiny_ref, audio))


def test_roundtrip_subprocess_entry_point(tiny_ref: MimiReference, tmp_path: Path) -> None:
    """The real `python -m csm_jax.codec` entry point, end to end, in a fresh interpreter."""
    out = tmp_path / "sub.wav"
    env = {k: v for k, v in os.environ.items() if k != "CSM_JAX_MIMI"}
    proc = subprocess.run(
        [sys.executable, "-m", "csm_jax.codec", "roundtrip", str(DATA / "speech_1s.wav"), str(out),
         "--checkpoint", str(tiny_ref.hf_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert str(out) in proc.stdout
    audio = clip("speech_1s")
    got = read_wav(out)
    assert len(got) == len(audio)
    assert_audio_close(got, ref_roundtrip(tiny_ref, audio))

    # and a failure through the entry point: status 2, one `error:` line, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "csm_jax.codec", "roundtrip", str(tmp_path / "nope.wav"), str(tmp_path / "x.wav"),
         "--checkpoint", str(tiny_ref.hf_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "error: audio file not found" in proc.stderr
    assert not (tmp_path / "x.wav").exists()


def test_random_checkpoint_roundtrip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--checkpoint random`: full-size seeded random weights (slow, ~25 s on CPU). --checkpoint beats the env."""
    monkeypatch.setenv("CSM_JAX_MIMI", str(tmp_path / "not_there"))
    out = tmp_path / "random.wav"
    rc, stdout, err = cli(capsys, "roundtrip", DATA / "speech_1s.wav", out, "--checkpoint", "random")
    assert rc == 0, err
    assert "random codec weights" in err
    assert "[32, 15]" in stdout  # all 32 codebooks of the official architecture, ceil(26912 / 1920) frames
    got = read_wav(out)
    assert len(got) == len(clip("speech_1s"))
    assert np.all(np.isfinite(got)) and float(np.std(got)) > 1e-4, "random-weight output is silent"


# --------------------------------------------------------------------------------------------- convert ---
def test_convert_reads_back_with_same_codes(
    tiny_ref: MimiReference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "converted"
    rc, stdout, err = cli(capsys, "convert", tiny_ref.hf_dir, dst)
    assert rc == 0, err
    assert "wrote" in stdout and str(dst) in stdout
    assert (dst / "csm_jax.json").is_file() and (dst / "params").is_dir()

    audio = clip("speech_3s")
    want = tiny_ref.encode(audio[None])
    codec = csm_jax.load_codec(dst)
    assert codec.config.num_quantizers == tiny_ref.config.num_quantizers
    np.testing.assert_array_equal(np.asarray(codec.encode(audio[None])), want)

    # the converted directory is a valid --checkpoint for the other commands
    codes_file = tmp_path / "c.npz"
    rc, _, err = cli(capsys, "encode", SPEECH, codes_file, "--checkpoint", dst)
    assert rc == 0, err
    with np.load(codes_file) as f:
        np.testing.assert_array_equal(f["codes"], want[0])


@pytest.mark.parametrize("existing", ["unrelated_file", "converted_checkpoint"])
def test_convert_refuses_non_empty_dir(
    tiny_ref: MimiReference, tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: str
) -> None:
    dst = tmp_path / "dst"
    if existing == "unrelated_file":
        dst.mkdir()
        (dst / "keep.txt").write_text("precious")
    else:
        assert main(["convert", str(tiny_ref.hf_dir), str(dst)]) == 0
    before = snapshot(dst)
    assert before
    rc, stdout, err = cli(capsys, "convert", tiny_ref.hf_dir, dst)
    assert rc == 2
    assert err.startswith("error: ") and "not empty" in err and str(dst.name) in err, err
    assert "wrote" not in stdout
    assert snapshot(dst) == before, "a refused convert modified the destination"


# ---------------------------------------------------------------------------------------------- errors ---
# Each case: (inputs: in_dir -> None, argv: (in_dir, out_dir, ckpt) -> argv, substrings stderr must contain).
# `{in}` / `{out}` in the expected substrings are replaced by the input / output file names.
def _write(name: str, data: bytes | Callable[[Path], None]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        if callable(data):
            data(d / name)
        else:
            (d / name).write_bytes(data)
    return make


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda p: np.savez(p, **arrays)


GOOD_CODES = np.zeros((4, 3), np.int16)
NONE = _write("unused", b"")
ERROR_CASES: dict[str, tuple[Callable[[Path], None], Callable[[Path, Path, str], list], list[str]]] = {
    # ---- audio input
    "encode_missing_input": (NONE, lambda i, o, c: ["encode", i / "nope.wav", o / "x.npz", "--checkpoint", c],
                             ["audio file not found", "nope.wav"]),
    "roundtrip_missing_input": (NONE, lambda i, o, c: ["roundtrip", i / "nope.wav", o / "x.wav", "--checkpoint", c],
                                ["audio file not found", "nope.wav"]),
    "encode_corrupt_wav": (_write("bad.wav", b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk"),
                           lambda i, o, c: ["encode", i / "bad.wav", o / "x.npz", "--checkpoint", c],
                           ["cannot decode audio", "bad.wav"]),
    "encode_random_bytes": (_write("noise.wav", np.random.default_rng(0).bytes(5000)),
                            lambda i, o, c: ["encode", i / "noise.wav", o / "x.npz", "--checkpoint", c],
                            ["cannot decode audio", "noise.wav"]),
    "roundtrip_text_file": (_write("notes.txt", b"this is not audio\n" * 20),
                            lambda i, o, c: ["roundtrip", i / "notes.txt", o / "x.wav", "--checkpoint", c],
                            ["cannot decode audio", "notes.txt"]),
    "encode_empty_file": (_write("empty.wav", b""),
                          lambda i, o, c: ["encode", i / "empty.wav", o / "x.npz", "--checkpoint", c],
                          ["empty.wav"]),
    # ---- codes input
    "decode_missing_codes": (NONE, lambda i, o, c: ["decode", i / "nope.npz", o / "x.wav", "--checkpoint", c],
                             ["nope.npz"]),
    "decode_text_file": (_write("codes.npz", b"not an npz archive\n"),
                         lambda i, o, c: ["decode", i / "codes.npz", o / "x.wav", "--checkpoint", c],
                         ["codes.npz", "not a codes file"]),
    "decode_empty_file": (_write("codes.npz", b""),
                          lambda i, o, c: ["decode", i / "codes.npz", o / "x.wav", "--checkpoint", c],
                          ["codes.npz", "not a codes file"]),
    "decode_npy_not_npz": (_write("codes.npy", lambda p: np.save(p, GOOD_CODES)),
                           lambda i, o, c: ["decode", i / "codes.npy", o / "x.wav", "--checkpoint", c],
                           ["codes.npy", "not a codes file"]),
    "decode_wav_as_codes": (_write("speech.wav", SPEECH.read_bytes()),
                            lambda i, o, c: ["decode", i / "speech.wav", o / "x.wav", "--checkpoint", c],
                            ["speech.wav", "not a codes file"]),
    "decode_npz_without_codes": (_write("c.npz", _npz(tokens=GOOD_CODES, num_samples=np.int64(5760))),
                                 lambda i, o, c: ["decode", i / "c.npz", o / "x.wav", "--checkpoint", c],
                                 ["c.npz", "not a codes file", "codes"]),
    "decode_codes_3d": (_write("c.npz", _npz(codes=GOOD_CODES[None])),
                        lambda i, o, c: ["decode", i / "c.npz", o / "x.wav", "--checkpoint", c],
                        ["c.npz", "[K, T]", "[1, 4, 3]"]),
    "decode_codes_1d": (_write("c.npz", _npz(codes=GOOD_CODES[0])),
                        lambda i, o, c: ["decode", i / "c.npz", o / "x.wav", "--checkpoint", c],
                        ["c.npz", "[K, T]", "[3]"]),
    "decode_codes_too_large": (_write("c.npz", _npz(codes=np.full((4, 3), 16, np.int16))),  # tiny: 16 entries
                               lambda i, o, c: ["decode", i / "c.npz", o / "x.wav", "--checkpoint", c],
                               ["[0, 16)", "16"]),
    "decode_codes_negative": (_write("c.npz", _npz(codes=np.array([[0, 1, -1]] * 4, np.int16))),
                              lambda i, o, c: ["decode", i / "c.npz", o / "x.wav", "--checkpoint", c],
                              ["[0, 16)", "-1"]),
    "decode_codes_float": (_write("c.npz", _npz(codes=GOOD_CODES.astype(np.float32))),
                           lambda i, o, c: ["decode", i / "c.npz", o / "x.wav", "--checkpoint", c],
                           ["integer", "float32"]),
    "decode_too_many_codebooks": (_write("c.npz", _npz(codes=np.zeros((5, 3), np.int16))),
                                  lambda i, o, c: ["decode", i / "c.npz", o / "x.wav", "--checkpoint", c],
                                  ["5 codebooks", "1..4"]),
    "decode_zero_frames": (_write("c.npz", _npz(codes=np.zeros((4, 0), np.int16))),
                           lambda i, o, c: ["decode", i / "c.npz", o / "x.wav", "--checkpoint", c],
                           ["empty"]),
    # ---- checkpoint / options
    "nonexistent_checkpoint": (NONE, lambda i, o, c: ["encode", SPEECH, o / "x.npz", "--checkpoint", i / "no_ckpt"],
                               ["no such checkpoint", "no_ckpt"]),
    "checkpoint_without_weights": (NONE, lambda i, o, c: ["roundtrip", SPEECH, o / "x.wav", "--checkpoint", i],
                                   ["no model.safetensors"]),
    "num_codebooks_zero": (NONE, lambda i, o, c: ["encode", SPEECH, o / "x.npz", "--checkpoint", c,
                                                  "--num-codebooks", 0], ["num_codebooks", "1..4", "0"]),
    "num_codebooks_too_many": (NONE, lambda i, o, c: ["roundtrip", SPEECH, o / "x.wav", "--checkpoint", c,
                                                      "--num-codebooks", 5], ["num_codebooks", "1..4", "5"]),
    "convert_missing_source": (NONE, lambda i, o, c: ["convert", i / "no_src", o / "converted"],
                               ["no such checkpoint", "no_src"]),
    # ---- output
    "encode_output_dir_missing": (NONE, lambda i, o, c: ["encode", SPEECH, o / "sub" / "x.npz", "--checkpoint", c],
                                  ["x.npz"]),
    "decode_output_dir_missing": (_write("c.npz", _npz(codes=GOOD_CODES, num_samples=np.int64(5000))),
                                  lambda i, o, c: ["decode", i / "c.npz", o / "sub" / "x.wav", "--checkpoint", c],
                                  ["x.wav"]),
    "roundtrip_output_dir_missing": (NONE, lambda i, o, c: ["roundtrip", SPEECH, o / "sub" / "x.wav",
                                                            "--checkpoint", c], ["x.wav"]),
    "roundtrip_output_unknown_format": (NONE, lambda i, o, c: ["roundtrip", SPEECH, o / "x.audio", "--checkpoint", c],
                                        ["x.audio"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_exits_2_with_message_and_writes_nothing(
    tiny_ref: MimiReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    make_inputs, argv, expected = ERROR_CASES[case]
    monkeypatch.delenv("CSM_JAX_MIMI", raising=False)
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    make_inputs(in_dir)
    inputs_before = snapshot(in_dir)
    try:
        rc, stdout, err = cli(capsys, *argv(in_dir, out_dir, str(tiny_ref.hf_dir)))
    except Exception as e:  # main must report, not raise
        pytest.fail(f"main raised {type(e).__name__}: {e} instead of returning 2 with an `error:` message")
    assert rc == 2, f"exit status {rc}\nstdout: {stdout}\nstderr: {err}"
    assert err.startswith("error: "), err
    for part in expected:
        assert part in err, f"stderr does not mention {part!r}: {err!r}"
    assert files_under(out_dir) == set(), f"a failed command wrote {sorted(files_under(out_dir))}"
    assert snapshot(in_dir) == inputs_before, "a failed command modified its input"


def test_missing_checkpoint_names_both_ways_to_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CSM_JAX_MIMI", raising=False)
    for command, out in (("encode", "x.npz"), ("roundtrip", "x.wav")):
        rc, _, err = cli(capsys, command, SPEECH, tmp_path / out)
        assert rc == 2
        assert err.startswith("error: ") and "--checkpoint" in err and "CSM_JAX_MIMI" in err, err
    np.savez(tmp_path / "c.npz", codes=GOOD_CODES)
    rc, _, err = cli(capsys, "decode", tmp_path / "c.npz", tmp_path / "x.wav")
    assert rc == 2 and "CSM_JAX_MIMI" in err, err
    assert files_under(tmp_path) == {"c.npz"}


def test_env_checkpoint_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CSM_JAX_MIMI", str(tmp_path / "gone"))
    rc, _, err = cli(capsys, "roundtrip", SPEECH, tmp_path / "x.wav")
    assert rc == 2
    assert err.startswith("error: ") and "no such checkpoint" in err and "gone" in err, err
    assert files_under(tmp_path) == set()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse usage errors (no command, unknown command, missing output) exit with status 2 and a usage line."""
    for argv in ([], ["transcode", "a", "b"], ["encode", str(SPEECH)]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
        assert "usage:" in capsys.readouterr().err
