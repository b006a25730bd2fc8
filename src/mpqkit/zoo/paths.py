"""Locate the shared data and model folders.

Resolution is lazy (call time, never import time) so that settings given on the command line or
in the environment after import are honoured.
"""
from __future__ import annotations

import os
from pathlib import Path

from mpqkit.errors import MissingResourceError

__all__ = ["data_root", "models_dir"]


def _candidates(override: str | Path | None, env: str, sub: str) -> list[Path]:
    """Ordered candidate folders: explicit override, environment, cwd-relative, next to the repo."""
    if override is not None:
        return [Path(override).expanduser()]
    if os.environ.get(env):
        return [Path(os.environ[env]).expanduser()]
    return [
        Path.cwd().parent / "shared" / sub,
        Path(__file__).resolve().parents[3].parent / "shared" / sub,
    ]


def _resolve(override: str | Path | None, env: str, sub: str, what: str, flag: str, holds: str) -> Path:
    cands = _candidates(override, env, sub)
    for c in cands:
        if c.is_dir():
            return c
    if len(cands) == 1 and cands[0].exists():  # given explicitly, but not a folder
        raise MissingResourceError(
            f"{what}: {cands[0]} is a file, not a folder. Set {flag} or ${env} to the folder that holds {holds}"
        )
    looked = ", ".join(str(c) for c in cands)
    raise MissingResourceError(
        f"{what} not found (looked in {looked}). Set {flag} or ${env} to the folder that holds {holds}"
    )


def data_root(override: str | Path | None = None) -> Path:
    """Folder that holds ``cifar10/`` (and ``imagenet_val_subset/``, ``text/``): override, else $MPQKIT_DATA, else ../shared/data, else shared/data beside the repo."""
    return _resolve(override, "MPQKIT_DATA", "data", "Data folder", "--data-root",
                    "cifar10/ (and imagenet_val_subset/, text/ for those datasets)")


def models_dir(override: str | Path | None = None) -> Path:
    """Folder that holds the checkpoint folders: override, else $MPQKIT_MODELS, else ../shared/models, else beside the repo."""
    return _resolve(
        override, "MPQKIT_MODELS", "models", "Model checkpoints", "--models-dir",
        "cifar10_resnet20_jpegft/, cifar10_resnet_akamaster/ and the other model folders",
    )
