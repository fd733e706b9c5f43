"""HuggingFace Hub repo ids resolved through the local cache, never the network.

``vtm-jax convert --source hf --input google/vivit-b-16x2-kinetics400`` reads the snapshot a
user already has in the HuggingFace cache (``hf download``, or any earlier
``from_pretrained``), found by ``huggingface_hub`` with ``local_files_only=True``: conversion
stays offline, and a model that is not cached is one line saying where it was looked for.
"""

from __future__ import annotations

import os
import re

from vtm_jax.errors import UserError

# Hub repo ids: "name" or "owner/name", letters, digits, '-', '_' and '.', at most 96 each.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def looks_like_repo_id(text: str) -> bool:
    """``text`` could name a Hub repo (``owner/name``) rather than a local path."""
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith(".")


def hub_cache_dir() -> str:
    """The Hub cache the environment names now, in huggingface_hub's order of precedence.

    Read at each call rather than from ``huggingface_hub.constants``, which are fixed when
    that module is first imported: a notebook (or a test) that sets ``HF_HUB_CACHE`` or
    ``HF_HOME`` later still gets the cache it names.
    """
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    cache = (
        os.environ.get("HF_HUB_CACHE")
        or os.environ.get("HUGGINGFACE_HUB_CACHE")
        or os.path.join(home, "hub")
    )
    return os.path.expandvars(os.path.expanduser(cache))


def cached_snapshot(repo_id: str) -> str:
    """The directory of ``repo_id``'s cached snapshot (its ``main`` revision).

    A UserError when huggingface_hub is not installed, or the repo has no complete cached
    snapshot, naming the cache directory that was searched.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise UserError(
            f"{repo_id} is not a local path, and reading a Hub repo id from the HuggingFace "
            "cache needs huggingface_hub: pip install 'vtm-jax[convert]'"
        ) from None
    cache = hub_cache_dir()
    where = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    try:
        return str(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as e:  # not cached, partial, bad id
        reason = "not in the local HuggingFace cache"
        if (
            type(e).__name__ == "IncompleteSnapshotError"
        ):  # a subclass, where huggingface_hub has it
            reason = "only partly in the local HuggingFace cache"
        raise UserError(
            f"no such file or directory {repo_id!r}, and as a Hub repo id it is {reason} "
            f"(looked in {where}); download it once with `hf download {repo_id}` or give "
            "the model directory"
        ) from None
