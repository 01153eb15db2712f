"""API keys of the serving app, and the digest that owns a caller's session caches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from llmopt.serve._protocol import ServingSetupError

__all__ = ["load_api_keys", "owner_of"]


def load_api_keys(env_var: str | None, path: str | None) -> frozenset[str] | None:
    """The accepted API keys: comma- or line-separated, from an environment variable and/or a secret file.

    Returns:
        ``None`` when neither source is configured (auth off); otherwise the non-empty set of keys.

    Raises:
        ServingSetupError: If a configured source is missing or holds no key (refusing to start beats
            silently serving without auth).
    """
    if not env_var and not path:
        return None
    keys: set[str] = set()
    if env_var:
        value = os.environ.get(env_var)
        if value is None:
            raise ServingSetupError(
                f"serving.api_keys_env={env_var!r} but that environment variable is not set in the replica; "
                "set it (e.g. from a Kubernetes Secret) or unset serving.api_keys_env to turn auth off"
            )
        keys.update(k.strip() for k in value.replace("\n", ",").split(","))
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ServingSetupError(
                f"serving.api_keys_file={path!r} does not exist; mount the secret there or unset the field"
            )
        keys.update(k.strip() for k in file.read_text().replace("\n", ",").split(","))
    keys.discard("")
    if not keys:
        raise ServingSetupError("the configured API-key source holds no key; add at least one key")
    return frozenset(keys)


def owner_of(api_key: str | None) -> str:
    """The cache owner of a caller: a digest of its API key (keys never leave the ingress in clear)."""
    if api_key is None:
        return "anonymous"
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]
