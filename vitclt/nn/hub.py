"""Transcoders on the Hugging Face hub: resolve `org/repo[@revision]` to a local directory, and publish one.

A transcoder source is a local path or a hub id. `resolve_source` is the one resolver that
`Transcoder.from_pretrained`, `vitclt eval`, `browse`, `explain` and `intervene` go through:

- ``hf:org/repo[@revision]`` always means the hub;
- a local path that exists wins, unless it is shaped like a hub id and holds no transcoder (such as
  the ``org/repo/eval`` directory that ``vitclt eval org/repo`` writes for its outputs);
- otherwise ``org/repo[@revision]`` is downloaded with ``huggingface_hub.snapshot_download`` (only the
  transcoders' config.json, model.safetensors and the README.md model card) into the hub cache
  (``HF_HUB_CACHE``), or read from that cache alone when ``HF_HUB_OFFLINE=1``.

Publishing (`upload`) creates the repository if needed and uploads a staged folder in one commit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from vitclt.errors import ConfigError, VitcltError

HUB_PREFIX = "hf:"
"""Prefix that forces a source to be read from the hub even where a local path of that name exists."""

DOWNLOAD_PATTERNS = ["config.json", "model.safetensors", "README.md", "*/config.json", "*/model.safetensors"]
"""Files of a hub repository that a transcoder needs (fnmatch patterns; ``*`` also matches ``/``)."""

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?")


class HubError(VitcltError):
    """A hub repository cannot be resolved or written (not cached while offline, not found, no permission)."""


class HubRef(NamedTuple):
    """A transcoder repository on the hub."""

    repo_id: str
    """``org/repo``."""
    revision: str | None
    """Branch, tag or commit (None: the default branch)."""

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(spec: str | os.PathLike) -> HubRef | None:
    """The `HubRef` that `spec` names (``[hf:]org/repo[@revision]``), or None if it is not shaped like one."""
    text = os.fspath(spec)
    if text.startswith(HUB_PREFIX):
        text = text[len(HUB_PREFIX):]
    match = _HUB_ID.fullmatch(text)
    if not match or text.startswith((".", "/")) or ".." in match["repo"]:
        return None
    return HubRef(match["repo"], match["revision"])


def _holds_transcoder(path: Path, max_depth: int = 3) -> bool:
    """Whether `path` or a directory up to `max_depth` levels below it has a config.json."""
    frontier = [path]
    for _ in range(max_depth + 1):
        if any((p / "config.json").is_file() for p in frontier):
            return True
        frontier = [c for p in frontier for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")]
    return False


def offline() -> bool:
    """Whether the hub is switched off: HF_HUB_OFFLINE (else TRANSFORMERS_OFFLINE) as huggingface_hub reads it, but now."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """The hub cache that downloads go to: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def download(ref: HubRef, patterns: list[str] | None = None) -> Path:
    """The local snapshot directory of `ref`'s files (`patterns`, default: a vitclt transcoder's), downloaded into
    the hub cache if needed.

    Offline (HF_HUB_OFFLINE=1) only the cache is read. Every failure is a one-line `HubError`.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    is_offline, cache = offline(), cache_dir()
    revision = ref.revision or "main"
    try:
        path = snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache,
                                 allow_patterns=patterns or DOWNLOAD_PATTERNS, local_files_only=is_offline)
    except GatedRepoError:
        raise HubError(f"hub repo {ref.repo_id} is gated: accept its terms on huggingface.co and log in (hf auth login), "
                       "or pass a local directory") from None
    except RepositoryNotFoundError:
        raise HubError(f"{ref.repo_id} is not a local directory, and the Hugging Face hub has no model repo of that name (or "
                       "it is private: log in with hf auth login or set HF_TOKEN); check the path or the id") from None
    except RevisionNotFoundError:
        raise HubError(f"hub repo {ref.repo_id} has no revision {revision!r}: pass an existing branch, tag or commit "
                       "after @") from None
    except LocalEntryNotFoundError:
        if is_offline:
            raise HubError(f"{ref} is not a local directory nor in the hub cache {cache}, and HF_HUB_OFFLINE is set: "
                           f"connect and unset HF_HUB_OFFLINE, or download it on a connected machine (hf download "
                           f"{ref.repo_id}) and pass that directory") from None
        raise HubError(f"{ref} is not a local directory nor in the hub cache {cache}, and the Hugging Face hub cannot be "
                       "reached: check the connection, or download it elsewhere and pass that directory") from None
    except HfHubHTTPError as err:
        raise HubError(f"the hub refused {ref}: {str(err).splitlines()[0]}") from None
    return Path(path)


class Source(NamedTuple):
    """A resolved transcoder source."""

    path: Path
    """Local directory: the path as given, or the hub snapshot."""
    name: str
    """What to call a transcoder at the top of `path`: its directory name, or the hub repo's name."""
    hub: HubRef | None
    """The hub repository it came from (None: local)."""


def resolve_source(spec: str | os.PathLike) -> Source:
    """Where a transcoder source lives on this machine; see the module docstring for the rules.

    A path that neither exists nor looks like a hub id comes back as is, for the caller's own
    "does not exist" message.
    """
    text = os.fspath(spec)
    ref = parse_hub_id(text)
    if not text.startswith(HUB_PREFIX):
        local = Path(text)
        if local.exists() and (ref is None or not local.is_dir() or _holds_transcoder(local)):
            return Source(local, local.resolve().name, None)
        if ref is None:
            return Source(local, local.name, None)
    elif ref is None:
        raise ConfigError(f"{text!r} is not a hub id: write hf:org/repo or hf:org/repo@revision")
    return Source(download(ref), ref.repo_id.split("/")[1], ref)


def resolve_directory(spec: str | os.PathLike) -> Path:
    """The local directory of a transcoder source (`resolve_source(spec).path`)."""
    return resolve_source(spec).path


def upload(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
           commit_message: str = "Upload transcoder with vitclt") -> str:
    """Create `repo_id` if needed and upload every file of `folder` in one commit; returns the commit URL.

    A new `revision` branch is created from the default branch. Failures are one-line `HubError`s.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if parse_hub_id(repo_id) is None or repo_id.startswith(HUB_PREFIX) or "@" in repo_id:
        raise ConfigError(f"{repo_id!r} is not a hub repository id: write org/repo (the revision goes in --revision)")
    if offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or use --dry-run DIR to write what "
                       "would be uploaded")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message, repo_type="model")
    except OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or use --dry-run DIR") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        fix = ("log in with hf auth login or set HF_TOKEN to a token with write access" if status in (401, 403)
               else "check the repo id and your connection")
        raise HubError(f"uploading to {repo_id} failed ({str(err).splitlines()[0]}): {fix}") from None
    return str(getattr(info, "commit_url", info))
