"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel and shows what its text says.

The notebook is executed headlessly with nbclient in an ipykernel started from this interpreter, cwd = notebooks/,
`CSM_JAX_CSM` unset (so it loads the built-in default voice) and matplotlib's inline backend, which renders with
Agg (no display needed) into image/png outputs. After the notebook's own cells, one extra cell, added in memory only,
saves the notebook's arrays to an .npz. The tests then check the executed outputs (printed shapes, figures, the WAV
data inside the audio players) and those arrays, cell by cell.

The committed notebook must carry no outputs, so it can never show stale results.

Needs nbclient, nbformat, ipykernel and matplotlib (the kernel imports matplotlib and matplotlib_inline).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import numpy as np
import pytest
import soundfile as sf

import csm_jax
from csm_jax.csm.frontend import make_frontend
from csm_jax.default_model import NAME as DEFAULT_NAME
from csm_jax.default_model import VOICE_DIR

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
CLIP = ROOT / "tests" / "data" / "speech_3s.wav"
TRANSCRIPT = "The quick brown fox jumps over the lazy dog."  # scripts/make_test_audio.py, MEDIUM
FRAME, SR, K = 1920, 24_000, 8  # the default voice: 8 codebooks; 80 ms frames at 24 kHz
CELL_TIMEOUT_S = 300
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours in kernel tracebacks
STREAM_ATOL = 1e-5  # streamed vs offline decoding (tests/test_codec_streaming.py)

CODE_CELLS = ["load-model", "codec-roundtrip", "generate", "stream", "spectrogram", "code-grid"]
# Saves what the notebook computed; runs after the notebook's cells (even after a failure), never committed.
EXPOSED = ["clip", "clip_codes", "recon", "reply", "reply_codes", "redecoded", "tokens", "mask", "streamed",
           "MAX_AUDIO_MS", "TEXT", "TRANSCRIPT"]
DUMP_CELL = """
import os as _os, numpy as _np
_vals = {_k: _np.asarray(globals()[_k]) for _k in __NAMES__ if _k in globals()}
_vals["cwd"] = _np.asarray(_os.getcwd())
_vals["executable"] = _np.asarray(__import__("sys").executable)
if "gen" in globals():
    _vals["gen_num_codebooks"] = _np.asarray(gen.num_codebooks)
    _vals["codec_num_codebooks"] = _np.asarray(gen.codec.num_codebooks)
_np.savez(__PATH__, **_vals)
"""


def read_notebook() -> Any:
    return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_notebook_is_valid_and_has_no_outputs() -> None:
    nb = read_notebook()
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.id for c in code] == CODE_CELLS, "code cells changed: update this test's checks"
    stale = [c.id for c in code if c.outputs or c.execution_count is not None]
    assert stale == [], f"cells saved with outputs or execution counts (clear them before committing): {stale}"


# execution -------------------------------------------------------------------------------------------------
class Executed:
    def __init__(self, nb: Any, values: dict[str, np.ndarray], failure: str | None):
        self.nb, self.values, self.failure = nb, values, failure
        self.cells = {c.id: c for c in nb.cells}

    def cell(self, cid: str) -> Any:
        """The executed cell `cid`; fails (pointing at the first error) if it did not run cleanly."""
        cell = self.cells[cid]
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if cell.execution_count is None or errors:
            pytest.fail(f"cell {cid!r} did not run cleanly; notebook failure: {self.failure}", pytrace=False)
        return cell

    def value(self, name: str) -> np.ndarray:
        if name not in self.values:
            pytest.fail(f"notebook variable {name!r} missing; notebook failure: {self.failure}", pytrace=False)
        return self.values[name]


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Executed:
    nb = read_notebook()
    dump = tmp_path_factory.mktemp("quickstart") / "values.npz"
    env = dict(os.environ)
    env.pop("CSM_JAX_CSM", None)  # the default model: no checkpoint needed
    env.pop("CSM_JAX_MIMI", None)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # Agg rendering, figures as image/png
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    n_cells = len(nb.cells)
    # The dump runs even after a failure, so the cells that did run are still checked.
    nb.cells.append(nbformat.v4.new_code_cell(
        DUMP_CELL.replace("__NAMES__", repr(EXPOSED)).replace("__PATH__", repr(str(dump)))))
    failure = None
    with client.setup_kernel(env=env):
        for index, cell in enumerate(nb.cells):
            try:
                client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
            except nbclient.exceptions.CellExecutionError as e:
                failure = failure or f"cell {cell.get('id')!r}: {ANSI.sub('', str(e))}"
                if index < n_cells:  # skip the rest of the notebook, still run the dump
                    client.execute_cell(nb.cells[-1], len(nb.cells) - 1)
                break
    del nb.cells[n_cells:]
    values = dict(np.load(dump)) if dump.exists() else {}
    return Executed(nb, values, failure)


# output helpers ----------------------------------------------------------------------------------------------
def text_of(cell: Any) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def stderr_of(cell: Any) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")


def printed_float(cell: Any, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*=\s*(\S+)", text_of(cell))
    assert m, f"{label!r} not printed in cell {cell.id!r}:\n{text_of(cell)}"
    return float(m.group(1))


def audio_players(cell: Any) -> list[tuple[int, np.ndarray]]:
    """(sample rate, samples) of every IPython.display.Audio player in the cell, decoded from its embedded WAV."""
    players = []
    for out in cell.outputs:
        html = out.get("data", {}).get("text/html", "") if out.output_type == "display_data" else ""
        for b64 in re.findall(r'<source src="data:audio/wav;base64,([A-Za-z0-9+/=\s]+)"', html):
            data, rate = sf.read(io.BytesIO(base64.b64decode(b64)), dtype="float32")
            players.append((rate, data))
    return players


def figures(cell: Any) -> list[tuple[str, int, int]]:
    """(text/plain repr, width, height) of every PNG figure the cell displayed."""
    figs = []
    for out in cell.outputs:
        data = out.get("data", {}) if out.output_type in ("display_data", "execute_result") else {}
        if "image/png" in data:
            png = base64.b64decode(data["image/png"])
            assert png[:8] == b"\x89PNG\r\n\x1a\n", "image/png output is not a PNG"
            width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
            figs.append((data.get("text/plain", ""), width, height))
    return figs


# checks, one notebook section each ------------------------------------------------------------------------
def test_notebook_runs_without_errors(executed: Executed) -> None:
    assert executed.failure is None, executed.failure
    for cid in CODE_CELLS:
        cell = executed.cell(cid)
        assert stderr_of(cell) == "", f"cell {cid!r} wrote to stderr:\n{stderr_of(cell)}"
    assert str(executed.value("cwd")) == str(NOTEBOOK.parent)
    assert str(executed.value("executable")) == sys.executable  # the kernel runs in this venv


def test_loads_the_default_model(executed: Executed) -> None:
    out = text_of(executed.cell("load-model"))
    assert f"model: {DEFAULT_NAME}" in out, out
    assert f"CSM generates {K} codebooks; codec: {SR} Hz, {FRAME} samples per frame, {K} codebooks" in out, out
    assert int(executed.value("gen_num_codebooks")) == int(executed.value("codec_num_codebooks")) == K
    assert int(executed.value("MAX_AUDIO_MS")) == 5000


def test_codec_roundtrip(executed: Executed) -> None:
    cell = executed.cell("codec-roundtrip")
    clip, codes, recon = executed.value("clip"), executed.value("clip_codes"), executed.value("recon")
    np.testing.assert_array_equal(clip, csm_jax.load_audio(CLIP))
    n, t = len(clip), math.ceil(len(clip) / FRAME)
    assert codes.dtype == np.int32 and codes.shape == (1, K, t)
    assert 0 <= codes.min() and codes.max() < 1024  # the voice codec: 1024-entry codebooks
    assert recon.dtype == np.float32 and recon.shape == (FRAME * t,) and np.isfinite(recon).all()
    assert f"clip: {n} samples ({n / SR:.2f} s) -> codes (1, {K}, {t}) -> {FRAME * t} samples" in text_of(cell)
    players = audio_players(cell)
    assert [(rate, len(x)) for rate, x in players] == [(SR, n), (SR, FRAME * t)]


def test_generation_with_context(executed: Executed) -> None:
    cell = executed.cell("generate")
    reply, codes, redecoded = executed.value("reply"), executed.value("reply_codes"), executed.value("redecoded")
    frames = codes.shape[0]
    # The default voice ends its turn itself (the all-zero end frame) well before max_audio_ms.
    assert 3 <= frames < int(executed.value("MAX_AUDIO_MS")) // 80
    assert codes.dtype == np.int32 and codes.shape == (frames, K)
    assert 0 <= codes.min() and codes.max() < 1024  # the voice codec: 1024-entry codebooks
    assert reply.dtype == np.float32 and reply.shape == (FRAME * frames,) and np.isfinite(reply).all()
    assert np.abs(reply).max() > 0
    # generate() streamed exactly these codes: decoding them offline gives the same audio.
    diff = float(np.abs(redecoded - reply).max())
    assert diff <= STREAM_ATOL, f"max |decode(reply_codes) - reply| = {diff:.3g}"
    assert printed_float(cell, "max |decode(reply_codes) - reply|") == pytest.approx(diff, rel=1e-2, abs=1e-12)
    # The prompt: context text rows, the clip's code rows + an end frame, then the reply's text rows.
    tokens, mask = executed.value("tokens"), executed.value("mask")
    t_clip = executed.value("clip_codes").shape[-1]
    phonemes = make_frontend("espeak:en-us")  # the voice reads eSpeak NG phonemes, one token per UTF-8 byte
    text_rows = lambda speaker, text: len(f"[{speaker}]{phonemes(text)}".encode()) + 2  # noqa: E731  (+ BOS/EOS)
    # speaker 0 has no audio in the context: the voice's default preset turns go first (text rows, code rows + end)
    preset = json.loads((VOICE_DIR / "voices.json").read_text())["default"]["turns"]
    v = sum(text_rows(0, t["text"]) + math.ceil(sf.info(VOICE_DIR / t["audio"]).frames / FRAME) + 1 for t in preset)
    s = v + text_rows(1, TRANSCRIPT) + t_clip + 1 + text_rows(0, str(executed.value("TEXT")))
    assert str(executed.value("TRANSCRIPT")) == TRANSCRIPT
    assert tokens.shape == mask.shape == (s, K + 1)
    audio = slice(v + text_rows(1, TRANSCRIPT), v + text_rows(1, TRANSCRIPT) + t_clip)
    np.testing.assert_array_equal(tokens[audio, :K], executed.value("clip_codes")[0].T)
    assert f"prompt rows: ({s}, {K + 1}); reply codes: ({frames}, {K})" in text_of(cell)
    assert [(rate, len(x)) for rate, x in audio_players(cell)] == [(SR, FRAME * frames)]


def test_streaming_first_chunks(executed: Executed) -> None:
    cell = executed.cell("stream")
    streamed, reply = executed.value("streamed"), executed.value("reply")
    assert streamed.dtype == np.float32 and streamed.shape == (3 * FRAME,)
    diff = float(np.abs(streamed - reply[: len(streamed)]).max())
    assert diff <= STREAM_ATOL, f"streamed chunks differ from the start of generate(): {diff:.3g}"
    assert printed_float(cell, f"max |streamed - reply[:{3 * FRAME}]|") == pytest.approx(diff, rel=1e-2, abs=1e-12)
    arrivals = re.search(r"chunk arrival \(ms\): (.*)", text_of(cell))
    assert arrivals and len(arrivals.group(1).split(",")) == 3
    assert [(rate, len(x)) for rate, x in audio_players(cell)] == [(SR, 3 * FRAME)]


def test_spectrogram_figure(executed: Executed) -> None:
    figs = figures(executed.cell("spectrogram"))
    assert len(figs) == 1, figs
    text, width, height = figs[0]
    assert "with 4 Axes" in text, text  # input, round trip, reply + the colorbar
    assert width > 300 and height > 200


def test_code_grid_figure(executed: Executed) -> None:
    cell = executed.cell("code-grid")
    figs = figures(cell)
    assert len(figs) == 1, figs
    text, width, height = figs[0]
    assert "with 3 Axes" in text, text  # two grids + the colorbar
    assert width > height > 100
    # The plotted grids are [K, T]: the clip's encoder codes and the reply's CSM codes.
    assert executed.value("clip_codes")[0].shape == (K, math.ceil(len(executed.value("clip")) / FRAME))
    reply_frames = len(executed.value("reply")) // FRAME
    assert executed.value("reply_codes").T.shape == (K, reply_frames)

