"""Model references -> local directories: a local path, or a Hugging Face Hub repo id `org/name[@revision]`.

    resolve("checkpoints/csm-1b")        # an existing path: returned as is
    resolve("sesame/csm-1b")             # the `main` snapshot in the hub cache (downloaded if missing)
    resolve("sesame/csm-1b@v1")          # a branch, tag or commit hash

Hub look-ups go through `huggingface_hub.snapshot_download`, so its environment applies unchanged: the token
(`HF_TOKEN` or `hf auth login`), the cache (`HF_HUB_CACHE` / `HF_HOME`) and offline mode (`HF_HUB_OFFLINE=1`:
served from the cache only). An existing local path always wins over a repo id of the same spelling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from csm_jax.checkpoint import CheckpointError


def split_ref(ref: str) -> tuple[str, str | None] | None:
    """`"org/name@rev"` -> `("org/name", "rev")`, `"org/name"` -> `("org/name", None)`; None when `ref` is not a
    hub repo id (a repo id is exactly `org/name`; a revision may itself contain `/`, as `refs/pr/1`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, sep, revision = ref.partition("@")
    if repo_id.count("/") != 1 or (sep and not revision):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def resolve(ref: str | Path, *, revision: str | None = None,
            allow_patterns: Sequence[str] | str | None = None) -> Path:
    """The local directory (or file) for `ref`: an existing path as is, else the snapshot of hub repo
    `org/name[@revision]` (only the files matching `allow_patterns` are downloaded; None: all of them).

    Raises ValueError when `revision` and an `@revision` suffix disagree; FileNotFoundError when `ref` is neither
    an existing path nor a repo id, or the repo/revision is neither on the hub nor in the cache (offline); and
    PermissionError for a gated or private repo without a valid token."""
    if Path(ref).exists():
        return Path(ref)
    parsed = split_ref(str(ref))
    if parsed is None:
        raise FileNotFoundError(f"{ref} does not exist, and it is not a hub repo id (org/name or org/name@revision)")
    repo_id, suffix = parsed
    if suffix is not None and revision is not None and suffix != revision:
        raise ValueError(f"{ref}: revision {suffix!r} in the reference differs from revision={revision!r}")
    revision = suffix or revision
    return Path(_download(repo_id, revision, None if allow_patterns is None else
                          [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)))


def _download(repo_id: str, revision: str | None, allow_patterns: list[str] | None) -> str:
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_id} (revision {revision or constants.DEFAULT_REVISION})"
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
    except LocalEntryNotFoundError as e:  # offline, or the hub unreachable, and not (fully) cached
        if isinstance(e, getattr(errors, "IncompleteSnapshotError", ())):  # huggingface_hub >= 1.x
            raise FileNotFoundError(f"{what}: the cached snapshot lacks files the loader needs: {e}") from e
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"the hub could not be reached: {e.__cause__ or e}")
        raise FileNotFoundError(f"{what} is neither a local path nor in the Hugging Face cache "
                                f"{constants.HF_HUB_CACHE} ({why})") from e
    except GatedRepoError as e:
        raise PermissionError(f"{what} is gated: accept its terms on huggingface.co and set HF_TOKEN") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{what}: the hub repo has no such revision") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{what} is neither a local path nor a hub repo (for a private repo, set "
                                "HF_TOKEN)") from e
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code in (401, 403):
            raise PermissionError(f"{what}: access denied by the hub (check HF_TOKEN): {e}") from e
        raise


def checkpoint_path(ref: str | Path, allow_patterns: Sequence[str]) -> Path:
    """`resolve` for the checkpoint loaders: a failure is a CheckpointError ("no such checkpoint: ...")."""
    try:
        return resolve(ref, allow_patterns=allow_patterns)
    except FileNotFoundError as e:
        raise CheckpointError(f"no such checkpoint: {e}") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot fetch checkpoint {ref}: {e}") from e
