"""Hub ids (`org/name[@revision]`) in the CSM and codec loaders, resolved by `csm_jax.hub` through huggingface_hub.

Offline: a tiny random CSM (transformers `save_pretrained`, `csm_gen_fixtures`'s `tiny` shape, tokenizer, bundled
Mimi) and a Mimi exported from it are laid out in a temporary cache in the hub's own layout (`blobs/`, `snapshots/
<commit>/` symlinks, `refs/`), with HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1. The download path itself is
covered by a stand-in `snapshot_download` (the arguments the loaders pass, and the errors they report).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import flax.traverse_util
import httpx2
import huggingface_hub
import numpy as np
import pytest
import torch
from csm_gen_fixtures import build_model, write_tokenizer
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

from csm_jax import experiment, hub
from csm_jax.checkpoint import CheckpointError
from csm_jax.codec import codec as codec_module
from csm_jax.codec.__main__ import main as codec_main
from csm_jax.codec.codec import load_codec
from csm_jax.codec.export import export_transformers
from csm_jax.csm import weights as csm_weights
from csm_jax.csm.__main__ import main as csm_main
from csm_jax.csm.generator import load_csm
from csm_jax.csm.weights import load_csm_params

CSM, MIMI = "test-org/tiny-csm", "test-org/tiny-mimi"


@dataclasses.dataclass
class Cache:
    root: Path  # what HF_HUB_CACHE points at
    csm_a: Path  # the files of CSM's `main` (with prompt.json)
    csm_b: Path  # the files of CSM's tag `v2` (other weights, no prompt.json)
    mimi: Path
    commit_a: str
    commit_b: str


def put_snapshot(cache: Path, repo_id: str, src: Path, refs: tuple[str, ...]) -> str:
    """Lay out every file under `src` as one commit of model repo `repo_id`, as huggingface_hub does: content in
    `blobs/<sha256>`, `snapshots/<commit>/<path>` relative symlinks to it, `refs/<ref>` holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in src.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(hashlib.sha256(p.read_bytes()).digest() for p in files)).hexdigest()
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as the hub writes it
    return commit


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    tmp = tmp_path_factory.mktemp("hub")
    model = build_model("tiny")
    csm_a, csm_b = tmp / "csm_a", tmp / "csm_b"
    model.save_pretrained(csm_a)
    write_tokenizer(csm_a / "tokenizer.json")
    (csm_a / "prompt.json").write_text(json.dumps({"max_context_turns": 3}))
    (csm_a / "ckpt.pt").write_bytes(b"not needed")  # a file the loaders do not ask for
    with torch.no_grad():
        model.embed_text_tokens.weight.mul_(2.0)
    model.save_pretrained(csm_b)
    write_tokenizer(csm_b / "tokenizer.json")
    mimi = export_transformers(load_codec(csm_a), tmp / "mimi")
    root = tmp / "cache"
    commit_a = put_snapshot(root, CSM, csm_a, ("main",))
    commit_b = put_snapshot(root, CSM, csm_b, ("v2",))
    put_snapshot(root, MIMI, mimi, ("main",))
    return Cache(root, csm_a, csm_b, mimi, commit_a, commit_b)


@pytest.fixture(autouse=True)
def offline(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> Cache:
    """HF_HUB_CACHE -> the test cache, HF_HUB_OFFLINE=1; huggingface_hub reads both into `constants` at import."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache.root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache.root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def flat(params: Any) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def same_params(a: Any, b: Any) -> bool:
    fa, fb = flat(a), flat(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


# ------------------------------------------------------------------------------------------- resolve ---
@pytest.mark.parametrize(("ref", "parsed"), [
    ("sesame/csm-1b", ("sesame/csm-1b", None)),
    ("kyutai/mimi@main", ("kyutai/mimi", "main")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("org/name@", None),  # empty revision
    ("name", None),  # a bare name is taken as a path, not a legacy repo id
    ("/abs/path", None),
    ("a/b/c", None),
    ("./a/b", None),
    ("org/na--me", None),
])
def test_split_ref(ref: str, parsed: tuple[str, str | None] | None) -> None:
    assert hub.split_ref(ref) == parsed


def test_local_paths_are_returned_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve(str(tmp_path)) == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name@v1").mkdir(parents=True)
    assert hub.resolve("org/name@v1") == Path("org/name@v1")  # a path that exists wins, even spelled as a repo id


def test_hub_id_resolves_to_the_cached_snapshot(cache: Cache) -> None:
    snap = cache.root / f"models--{CSM.replace('/', '--')}" / "snapshots"
    assert hub.resolve(CSM) == (snap / cache.commit_a).resolve()
    assert hub.resolve(CSM, revision="v2") == (snap / cache.commit_b).resolve()
    assert hub.resolve(f"{CSM}@v2") == hub.resolve(f"{CSM}@{cache.commit_b}") == (snap / cache.commit_b).resolve()
    assert hub.resolve(f"{CSM}@v2", revision="v2") == (snap / cache.commit_b).resolve()
    with pytest.raises(ValueError, match="differs"):
        hub.resolve(f"{CSM}@v2", revision="main")


# ------------------------------------------------------------------------------------------- loaders ---
def test_load_csm_hub_id_equals_local_dir(cache: Cache) -> None:
    local, remote = load_csm(cache.csm_a), load_csm(CSM)
    assert remote.cfg == local.cfg and same_params(remote.params, local.params)
    assert remote.codec is not None and local.codec is not None and same_params(remote.codec.params, local.codec.params)
    assert remote.tokenizer is not None and remote.tokenizer.to_str() == local.tokenizer.to_str()
    assert remote.format.max_context_turns == local.format.max_context_turns == 3  # prompt.json came along


def test_revision_selects_the_other_snapshot(cache: Cache) -> None:
    main, _ = load_csm_params(CSM)
    for ref in (f"{CSM}@v2", f"{CSM}@{cache.commit_b}"):
        gen = load_csm(ref)
        assert same_params(gen.params, load_csm_params(cache.csm_b)[0]), ref
        assert not same_params(gen.params, main), ref
        assert gen.format.max_context_turns == 16  # v2 has no prompt.json


def test_codec_hub_ids(cache: Cache) -> None:
    local = load_codec(cache.mimi)
    assert same_params(load_codec(MIMI).params, local.params)
    assert load_codec(MIMI, num_codebooks=2).num_codebooks == 2
    assert same_params(load_codec(CSM).params, local.params)  # a CSM repo's bundled `codec_model.*` weights
    gen = load_csm(f"{CSM}@v2", codec=MIMI)
    assert gen.codec is not None and same_params(gen.codec.params, local.params)


def test_missing_repo_or_revision_is_a_clear_error(cache: Cache) -> None:
    with pytest.raises(FileNotFoundError) as e:
        hub.resolve("test-org/absent")
    msg = str(e.value)
    for part in ("test-org/absent", "revision main", "neither a local path nor in the Hugging Face cache",
                 str(cache.root), "HF_HUB_OFFLINE"):
        assert part in msg, msg
    with pytest.raises(FileNotFoundError, match="revision nope"):
        hub.resolve(f"{CSM}@nope")
    with pytest.raises(CheckpointError, match="no such checkpoint: test-org/absent .revision main. is neither"):
        load_csm("test-org/absent")
    with pytest.raises(CheckpointError, match="no such checkpoint: test-org/absent"):
        load_codec("test-org/absent")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_csm(CSM, codec="test-org/absent")


def test_neither_path_nor_repo_id(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match="does not exist, and it is not a hub repo id"):
        hub.resolve(missing)
    with pytest.raises(CheckpointError, match=f"no such checkpoint: {missing}"):
        load_csm_params(missing)


def test_local_directory_wins_over_the_hub(cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cache.csm_b, tmp_path / CSM)
    assert same_params(load_csm_params(CSM)[0], load_csm_params(cache.csm_b)[0])


# ---------------------------------------------------------------------------------- CLI and configs ---
def test_clis_take_hub_ids(cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert codec_main(["export", MIMI, str(tmp_path / "mimi")]) == 0
    assert same_params(load_codec(tmp_path / "mimi").params, load_codec(cache.mimi).params)
    assert csm_main(["export", CSM, str(tmp_path / "csm")]) == 0
    assert json.loads((tmp_path / "csm" / "prompt.json").read_text()) == {"max_context_turns": 3}  # from the snapshot
    assert same_params(load_csm_params(tmp_path / "csm")[0], load_csm_params(cache.csm_a)[0])
    assert csm_main(["convert", f"{CSM}@v2", str(tmp_path / "conv")]) == 0
    assert (tmp_path / "conv" / "tokenizer.json").is_file() and (tmp_path / "conv" / "codec").is_dir()
    assert same_params(load_csm_params(tmp_path / "conv")[0], load_csm_params(cache.csm_b)[0])
    capsys.readouterr()
    assert codec_main(["export", "test-org/absent", str(tmp_path / "x")]) == 2
    assert "test-org/absent" in capsys.readouterr().err


def test_experiment_model_init_hub_id(cache: Cache) -> None:
    cfg = {"model": {"init": CSM}, "codec": {}}
    assert experiment.tokenizer(cfg).to_str() == load_csm(cache.csm_a).tokenizer.to_str()
    assert same_params(experiment.codec(cfg).params, load_codec(cache.csm_a).params)


# ------------------------------------------------------------------------------- download (stand-in) ---
# the files of a transformers-format CSM repo such as sesame/csm-1b, and of kyutai/mimi
CSM_REPO = ["README.md", ".gitattributes", "ckpt.pt", "config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "preprocessor_config.json", "processor_config.json", "prompt.json", "csm_jax.json", "params/manifest.ocdbt",
            "codec/csm_jax.json"]
MIMI_REPO = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]


def test_loaders_download_only_what_they_read(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    snapshots = {CSM: cache.csm_a, MIMI: cache.mimi}

    def fake(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        return str(snapshots[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    load_csm(f"{CSM}@v2", codec=MIMI)
    (csm_id, csm_kw), (mimi_id, mimi_kw) = calls
    assert (csm_id, csm_kw["revision"], mimi_id, mimi_kw["revision"]) == (CSM, "v2", MIMI, None)
    assert csm_kw["allow_patterns"] == list(csm_weights.HUB_FILES)
    assert mimi_kw["allow_patterns"] == list(codec_module.HUB_FILES)
    assert set(filter_repo_objects(CSM_REPO, allow_patterns=csm_kw["allow_patterns"])) == set(CSM_REPO) - {
        "README.md", ".gitattributes", "ckpt.pt", "chat_template.jinja", "preprocessor_config.json",
        "processor_config.json"}
    assert set(filter_repo_objects(MIMI_REPO, allow_patterns=mimi_kw["allow_patterns"])) == {"config.json",
                                                                                              "model.safetensors"}


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))


@pytest.mark.parametrize(("error", "kind", "text"), [
    (GatedRepoError("gated", response=_response(401)), PermissionError, "gated: accept its terms"),
    (RepositoryNotFoundError("404", response=_response(404)), FileNotFoundError, "neither a local path nor a hub repo"),
    (LocalEntryNotFoundError("no cache"), FileNotFoundError, "the hub could not be reached"),
])
def test_hub_errors_are_explained(error: Exception, kind: type[Exception], text: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(repo_id: str, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(kind, match=text) as e:
        hub.resolve("test-org/private@dev")
    assert "test-org/private (revision dev)" in str(e.value)
    with pytest.raises(CheckpointError, match="test-org/private"):
        load_codec("test-org/private@dev")
