"""Fast checks of the model loader's error paths and cache rules (no real model involved)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from aurora_spec.models import loader
from aurora_spec.models.loader import ModelLoadError, model_info, resolve_model


def assert_cache_clean(root: Path) -> None:
    """A failed resolve leaves nothing in the cache (an empty root is removed, too)."""
    assert not root.exists() or not any(root.iterdir()), list(root.iterdir())


def test_unknown_name(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=r"unknown model 'no-such-model'.*smollm2-135m"):
        resolve_model("no-such-model", cache_dir=cache)
    assert_cache_clean(cache)


@pytest.mark.parametrize("rel", ["missing/dir", "missing.gguf"])
def test_missing_path(tmp_path: Path, rel: str) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="model path not found"):
        resolve_model(str(tmp_path / rel), cache_dir=cache)
    assert_cache_clean(cache)


def test_random_bytes_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(os.urandom(4096))
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        resolve_model(str(bad), cache_dir=cache)
    assert_cache_clean(cache)


def test_corrupt_gguf_with_valid_magic(tmp_path: Path) -> None:
    """Right magic, garbage after it: fails inside transformers, reported as one clear line."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + os.urandom(256))
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="cannot read GGUF model") as err:
        resolve_model(str(bad), cache_dir=cache)
    assert "\n" not in str(err.value)
    assert_cache_clean(cache)


def test_unreadable_gguf(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read any file")
    bad = tmp_path / "locked.gguf"
    bad.write_bytes(b"GGUF")
    bad.chmod(0)
    with pytest.raises(ModelLoadError, match="cannot read"):
        resolve_model(str(bad), cache_dir=tmp_path / "cache")


def test_dir_without_config(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"no config.json.*weights.gguf"):
        resolve_model(str(model_dir), cache_dir=tmp_path / "cache")
    assert_cache_clean(tmp_path / "cache")


def test_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights"):
        resolve_model(str(tmp_path))


def test_hf_dir_returned_as_is_and_described(tmp_path: Path) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "eos_token_id": 2,
           "max_position_embeddings": 8192, "vocab_size": 100, "hidden_size": 8,
           "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(tmp_path)) == tmp_path
    info = model_info(tmp_path, "tiny")
    assert (info.name, info.architecture, info.context_length) == ("tiny", "LlamaForCausalLM", 8192)
    assert info.eos_token_ids == (7, 2)  # generation_config first, no duplicates


def test_incomplete_cache_entry_is_not_used(tmp_path: Path) -> None:
    """A dir without the completion marker (e.g. tampered with) never counts as cached."""
    entry = tmp_path / "smollm2-135m"
    entry.mkdir()
    (entry / "config.json").write_text("{}")
    (entry / "model.safetensors").write_bytes(b"")
    assert not loader._is_complete(entry)
    (entry / loader.MARKER).write_text("{}")
    assert loader._is_complete(entry)


def test_default_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AURORA_CACHE", str(tmp_path))
    assert loader.default_cache_root() == tmp_path
    monkeypatch.delenv("AURORA_CACHE")
    assert loader.default_cache_root().parts[-3:] == (".cache", "aurora-spec", "models")


def test_main_reports_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert loader.main(["no-such-model"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown model")
