"""The embedded SmolLM2 cache: a partial or corrupt conversion is detected and rebuilt."""

from __future__ import annotations

import json

import pytest

import exporter.models as models


def _write_conversion(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != models._MARKER}
    (folder / models._MARKER).write_text(json.dumps({"files": files}))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_TRT_CACHE", str(tmp_path))
    calls = []

    def fake_convert(folder):
        calls.append(folder)
        _write_conversion(folder)

    monkeypatch.setattr(models, "convert_smollm2", fake_convert)
    folder = tmp_path / "models" / models.DEFAULT_MODEL
    return folder, calls


def test_a_complete_cache_is_reused(cache):
    folder, calls = cache
    _write_conversion(folder)
    assert models.resolve_model("smollm2-135m") == folder
    assert calls == []


@pytest.mark.parametrize("damage", ["no_marker", "truncated_weights", "missing_file", "bad_marker_json"])
def test_a_partial_or_corrupt_cache_is_rebuilt(cache, damage):
    folder, calls = cache
    _write_conversion(folder)
    if damage == "no_marker":  # killed before the marker was written
        (folder / models._MARKER).unlink()
    elif damage == "truncated_weights":
        (folder / "model.safetensors").write_bytes(b"x" * 10)
    elif damage == "missing_file":
        (folder / "config.json").unlink()
    else:
        (folder / models._MARKER).write_text("{not json")
    assert models.resolve_model("smollm2-135m") == folder
    assert calls == [folder]
    assert models.resolve_model("smollm2-135m") == folder and len(calls) == 1  # rebuilt once, then reused


def test_an_empty_cache_is_built(cache):
    folder, calls = cache
    assert models.resolve_model("smollm2-135m") == folder and calls == [folder]
