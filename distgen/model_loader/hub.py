"""Models named by their Hugging Face hub id, downloaded when they are not in the local cache.

``org/name`` is fetched with ``huggingface_hub.snapshot_download``, only the files a generative model
needs (config, tokenizer, safetensors weights, generation config), into the hub cache (``HF_HOME``,
``HF_HUB_CACHE``) or ``download_dir``, at ``revision``; ``HF_TOKEN`` authenticates, ``HF_ENDPOINT``
names another hub, and ``HF_HUB_OFFLINE=1`` uses the cache alone. ``org/name:file.gguf`` fetches one
GGUF file of a repository. A cached snapshot is used without asking the hub again only offline;
online, the hub is asked which commit the revision names (as vLLM and transformers do).
"""

from __future__ import annotations

# What a tokenizer needs (with config and generation config, *.json), and a generative model: that and
# its safetensors weights. PyTorch .bin weights are never fetched (distgen loads safetensors).
TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
MODEL_PATTERNS = [*TOKENIZER_PATTERNS, "*.safetensors"]


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` or ``org/name:file.gguf``: not a path a user would write."""
    repo = name.split(":", 1)[0]
    return repo.count("/") == 1 and not repo.startswith(("/", ".", "~")) and all(repo.split("/"))


def download(
    name: str,
    revision: str | None = None,
    download_dir: str | None = None,
    what: str = "model",
) -> str:
    """The local path of hub model ``name`` (a snapshot directory, or a GGUF file for
    ``org/name:file.gguf``), downloaded if the cache lacks it. Errors name the model and the hub."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    repo_id, _, filename = name.partition(":")
    patterns = MODEL_PATTERNS if what == "model" else TOKENIZER_PATTERNS
    try:
        if filename:
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=download_dir)
        return snapshot_download(repo_id, revision=revision, cache_dir=download_dir, allow_patterns=patterns)
    except Exception as e:  # huggingface_hub's and httpx's errors, told apart by kind below
        raise _explained(e, name, revision, constants.ENDPOINT, constants.HF_HUB_OFFLINE, what) from e


def _explained(
    e: Exception, name: str, revision: str | None, endpoint: str, offline: bool, what: str
) -> Exception:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(e, LocalEntryNotFoundError):  # the hub could not be asked, and the cache lacks it
        if offline:
            return FileNotFoundError(
                f"{what} {name!r}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                "download it once online, or unset HF_HUB_OFFLINE"
            )
        return ConnectionError(
            f"cannot download {what} {name!r}{at} from {endpoint}, and the local Hugging Face cache lacks "
            f"it: {e}. Check the network (HF_ENDPOINT names the hub), or set HF_HUB_OFFLINE=1 for the "
            "cache alone"
        )
    if isinstance(e, GatedRepoError):
        return PermissionError(f"{what} {name!r} on {endpoint} is gated: accept its terms, then set HF_TOKEN")
    if isinstance(e, RepositoryNotFoundError):
        return FileNotFoundError(
            f"{what} {name!r} not found on {endpoint} (or it is private: set HF_TOKEN), and it is not a "
            "local path"
        )
    if isinstance(e, RevisionNotFoundError):
        return FileNotFoundError(f"{what} {name!r} has no revision {revision!r} on {endpoint}")
    if isinstance(e, EntryNotFoundError):
        return FileNotFoundError(f"{what} {name!r}{at}: no such file on {endpoint} ({e})")
    return ConnectionError(
        f"cannot download {what} {name!r}{at} from {endpoint}: {type(e).__name__}: {e}. Without a "
        "network, set HF_HUB_OFFLINE=1 to use the local Hugging Face cache only"
    )
