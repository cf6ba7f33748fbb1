"""Where the default drafter/verifier pair comes from.

The project ships a trained demo pair in ``models/demo/`` (see its model
cards). A checkout without it falls back to the tiny random pair the tests
use, built once into a cache directory: enough to exercise every code path,
useless as a language model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "models" / "demo"
CACHE_DIR = Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))


def default_pair() -> tuple[Path, Path]:
    """Return (verifier_dir, drafter_dir) of the default models."""
    verifier, drafter = DEMO_DIR / "verifier", DEMO_DIR / "drafter"
    if (verifier / "config.json").is_file() and (drafter / "config.json").is_file():
        return verifier, drafter
    return tiny_pair(CACHE_DIR / "tiny-default")


def tiny_pair(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Build the tiny random pair into ``out`` once; later calls reuse it."""
    verifier, drafter = out / "verifier", out / "drafter"
    if not (verifier / "config.json").is_file() or not (drafter / "config.json").is_file():
        from decoding.offline.tiny_models import build_tiny_pair

        out.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so a concurrent reader never sees half a model.
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
        try:
            build_tiny_pair(tmp, seed=seed)
            if not out.exists():
                tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return verifier, drafter
