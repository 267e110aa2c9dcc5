"""Hub model ids resolved from the local Hugging Face cache, never downloaded: a recipe may name
`Qwen/Qwen3-0.6B` when its snapshot is on disk, and the error otherwise says how to get it."""

from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def from_hub_cache(name: str) -> str | None:
    """The local snapshot of hub model `name` in the HF cache (HF_HOME), if it was downloaded; never fetches."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True, cache_dir=hf_home())
    except Exception:  # not cached (or no huggingface_hub): the caller says how to get it
        return None


def hf_home() -> str:
    """The hub cache directory as the environment says now (huggingface_hub reads it once, at import)."""
    home = os.environ.get("HF_HOME", os.path.join("~", ".cache", "huggingface"))
    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))
