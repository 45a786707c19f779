"""notebooks/codec_tour.ipynb runs top to bottom and shows what its text says.

Every code cell is executed in order in one namespace (plain `exec`, cwd = notebooks/), with CSM_JAX_MIMI pointing
at the TINY random-weight transformers reference so it runs in seconds. The notebook's results are then checked
against its prose and against transformers' `MimiModel` (an oracle independent of csm_jax).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mimi_fixtures import FRAME, MimiReference, clip, max_abs_diff, tiny_ref  # noqa: F401  (fixtures)

import csm_jax

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "codec_tour.ipynb"
AUDIO_ATOL = 1e-4  # csm_jax vs transformers decoded audio, as in test_codec_parity
STREAM_ATOL = 1e-5  # streamed vs offline decoding, as the notebook claims ("matches offline decoding")


def code_cells() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = cell["source"]
            cells.append("".join(src) if isinstance(src, list) else src)
    return cells


def test_notebook_has_no_stored_errors() -> None:
    """The committed notebook carries no error outputs (it was not saved mid-failure)."""
    nb = json.loads(NOTEBOOK.read_text())
    errors = [out.get("ename") for cell in nb["cells"] if cell["cell_type"] == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert errors == []


def _run(cells: list[str], ns: dict[str, Any]) -> tuple[int, str] | None:
    """Execute the cells in order in `ns`; (index, message) of the first failing cell, or None."""
    for i, src in enumerate(cells):
        try:
            exec(compile(src, f"{NOTEBOOK.name} code cell {i}", "exec"), ns)
        except Exception as e:
            return i, f"{type(e).__name__}: {e}\n--- code cell {i} ---\n{src}"
    return None


def test_codec_tour(
    tiny_ref: MimiReference, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(NOTEBOOK.parent)
    monkeypatch.setenv("CSM_JAX_MIMI", str(tiny_ref.hf_dir))
    cells = code_cells()
    assert len(cells) == 4, f"the notebook has {len(cells)} code cells; update this test's checks"
    ns: dict[str, Any] = {"__name__": "__main__"}
    failure = _run(cells, ns)
    printed = capsys.readouterr().out

    # The results of every cell that ran are checked before a failure is reported, so a late failure does not
    # hide (or excuse) an early wrong result.
    k_all = tiny_ref.config.num_quantizers
    if "codec" in ns:  # cell 0: the checkpoint comes from CSM_JAX_MIMI
        codec = ns["codec"]
        assert isinstance(codec, csm_jax.MimiCodec)
        assert (codec.sample_rate, codec.frame_size, codec.num_codebooks) == (24_000, FRAME, k_all)

    if {"audio", "codes", "recon"} <= ns.keys():  # cell 1: offline encode / decode
        audio, codes, recon = ns["audio"], np.asarray(ns["codes"]), np.asarray(ns["recon"])
        n = len(audio)
        np.testing.assert_array_equal(audio, clip("speech_3s"))
        assert codes.dtype == np.int32
        assert codes.shape == (1, k_all, math.ceil(n / FRAME))
        np.testing.assert_array_equal(codes, tiny_ref.encode(audio[None]),
                                      err_msg="notebook codes differ from transformers MimiModel.encode")
        assert recon.dtype == np.float32 and recon.shape == (1, FRAME * codes.shape[-1])
        diff = max_abs_diff(recon, tiny_ref.decode(codes))
        assert diff <= AUDIO_ATOL, f"notebook recon vs transformers decode: max |diff| {diff:.3g}"

    if {"streamed", "offline", "n"} <= ns.keys():  # cell 2: streaming equals offline
        audio, n = ns["audio"], ns["n"]
        streamed, offline = np.asarray(ns["streamed"]), np.asarray(ns["offline"])
        assert n == len(audio) // FRAME * FRAME and n > 0
        assert streamed.shape == offline.shape == (1, n)
        diff = max_abs_diff(streamed, offline)
        assert diff <= STREAM_ATOL, f"max |streamed - offline| = {diff:.3g} > {STREAM_ATOL}"
        assert "max |streamed - offline| =" in printed, printed
        printed_diff = float(printed.split("max |streamed - offline| =")[1].split()[0])
        assert printed_diff == pytest.approx(diff, abs=1e-12)
        assert max_abs_diff(offline, tiny_ref.decode(tiny_ref.encode(audio[None, :n]))) <= AUDIO_ATOL

    if "codec8" in ns:  # cell 3: fewer codebooks (8, or all of them when the checkpoint has fewer)
        audio, codec8 = ns["audio"], ns["codec8"]
        k = min(8, k_all)
        assert codec8.num_codebooks == k
        codes8 = np.asarray(codec8.encode(audio[None]))
        assert codes8.shape == (1, k, math.ceil(len(audio) / FRAME))
        np.testing.assert_array_equal(codes8, tiny_ref.encode(audio[None], num_quantizers=k))

    if failure is not None:
        pytest.fail(f"{NOTEBOOK.name}: code cell {failure[0]} failed: {failure[1]}", pytrace=False)
    assert {"codec", "codes", "recon", "streamed", "offline", "codec8"} <= ns.keys()
