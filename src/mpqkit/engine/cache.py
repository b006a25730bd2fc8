"""Content-addressed on-disk cache of probe results, so a killed search resumes where it stopped.

Key = sha256 of (engine context: model weights hash, data hash, quantizer config, code version;
probe spec). Each entry is a small JSON file written atomically and carrying a checksum of its
payload: a truncated or corrupt entry is detected, ignored and recomputed, never trusted. Tensor
entries (e.g. a layer's GPTQ-rounded weight) are ``.pt`` files checked the same way.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..fileutil import atomic_write_bytes, atomic_write_text, sha256_json, tensor_sha256  # noqa: F401
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
        atomic_write_text(self._path(key), json.dumps({"payload": payload, "sha256": sha256_json(payload)}),
                          durable=False)

    def discard(self, key: str) -> None:
        """Remove an entry if there is one (e.g. a superseded resume record)."""
        self._path(key).unlink(missing_ok=True)

    def _tensor_path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.pt"

    def get_tensors(self, key: str) -> dict[str, Tensor] | None:
        """A tensor entry (name -> tensor, on CPU), or None when absent or corrupt (then removed)."""
        path = self._tensor_path(key)
        try:
            entry = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
            tensors = entry["tensors"]
            if entry["sha256"] != tensor_sha256(*(tensors[k] for k in sorted(tensors))) or \
                    entry["names"] != sorted(tensors):
                raise ValueError("checksum mismatch")
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception:  # noqa: BLE001 - any unreadable entry is recomputed, never trusted
            self.corrupt += 1
            self.misses += 1
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return tensors

    def put_tensors(self, key: str, tensors: dict[str, Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        buf = io.BytesIO()
        torch.save({"tensors": tensors, "names": sorted(tensors),
                    "sha256": tensor_sha256(*(tensors[k] for k in sorted(tensors)))}, buf)
        atomic_write_bytes(self._tensor_path(key), buf.getvalue())
