"""Content-addressed on-disk cache of probe results, so a killed search resumes where it stopped.

Key = sha256 of (engine context: model weights hash, data hash, quantizer config, code version;
probe spec). Each entry is a small JSON file written atomically and carrying a checksum of its
payload: a truncated or corrupt entry is detected, ignored and recomputed, never trusted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..fileutil import atomic_write_text, sha256_json, tensor_sha256  # noqa: F401  (re-exported)
from ..fileutil import state_dict_sha256 as module_sha256  # noqa: F401  (re-exported)


def default_cache_dir() -> Path:
    env = os.environ.get("MPQKIT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mpqkit"


class ProbeCache:
    """One directory of JSON entries per engine context."""

    def __init__(self, root: str | Path, context: dict[str, Any]):
        self.context_key = sha256_json(context)
        self.dir = Path(root) / self.context_key[:24]
        self.hits = self.misses = self.corrupt = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def key(self, spec: Any) -> str:
        return sha256_json({"ctx": self.context_key, "spec": spec})

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
            payload = entry["payload"]
            if entry["sha256"] != sha256_json(payload):
                raise ValueError("checksum mismatch")
        except FileNotFoundError:
            self.misses += 1
            return None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self.corrupt += 1
            self.misses += 1
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return payload

    def put(self, key: str, payload: dict[str, Any]) -> None:
        atomic_write_text(self._path(key), json.dumps({"payload": payload, "sha256": sha256_json(payload)}))

    def discard(self, key: str) -> None:
        """Remove an entry if there is one (e.g. a superseded resume record)."""
        self._path(key).unlink(missing_ok=True)
