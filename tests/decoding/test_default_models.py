"""decoding/default_models.py: the real pair is the default once installed, the demo pair before."""

from __future__ import annotations

import json

import decoding.default_models as dm


def test_default_is_the_demo_pair_until_the_real_pair_is_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "CACHE_DIR", tmp_path)
    assert dm.installed_real_pair() is None and dm.default_pair() == dm.demo_pair()
    verifier, drafter = tmp_path / dm.REAL_PAIR / "verifier", tmp_path / dm.REAL_PAIR / "drafter"
    for d in (verifier, drafter):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    assert dm.default_pair() == dm.demo_pair(), "a half-installed pair (no marker) is not the default"
    (verifier / dm.INSTALLED_MARKER).write_text(json.dumps({}))
    assert dm.default_pair() == dm.demo_pair()
    (drafter / dm.INSTALLED_MARKER).write_text(json.dumps({}))
    assert dm.default_pair() == (verifier, drafter)
