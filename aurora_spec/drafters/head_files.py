"""A draft head on disk: ``head.safetensors`` (the weights) and ``head.json`` (a small manifest:
format, version, config, held-out acceptance), never pickle. Each file is written atomically
(temp file + ``os.replace``) and the version is in both, so a reader that catches the pair
mid-update gets a ValueError, as does a missing, corrupt or mismatched file: callers
(flywheel/checkpoints.py) refuse it with a log line and keep the previous checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aurora_spec.atomic_files import atomic_write
from aurora_spec.drafters.eagle3_head import (
    Eagle3Config,
    Eagle3Head,
    _check_d2t,
    target_to_draft,
)

FORMAT = "aurora-eagle3-head"
FORMAT_VERSION = 1
WEIGHTS_FILE = "head.safetensors"
MANIFEST_FILE = "head.json"


def save_head(head: Eagle3Head, path_dir: str | os.PathLike) -> None:
    """Write head.safetensors and head.json, each atomically (temp file + os.replace). The
    version is in both, so a reader catching the pair mid-update gets a ValueError."""
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    meta = {"format": FORMAT, "version": str(head.version)}
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=meta))
    manifest: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION,
                                "version": head.version,
                                "config": dataclasses.asdict(head.config)}
    if head.heldout_alpha is not None:
        manifest["heldout_alpha"] = [round(a, 4) for a in head.heldout_alpha]
        if head.heldout_width is not None:
            manifest["heldout_width"] = head.heldout_width
    text = json.dumps(manifest, indent=2)
    atomic_write(out / MANIFEST_FILE, lambda p: Path(p).write_text(text))


def load_head(path_dir: str | os.PathLike, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Eagle3Head:
    """Load a saved head; ValueError on a missing, corrupt or inconsistent checkpoint."""
    src = Path(path_dir)
    config, version, heldout_alpha, heldout_width = _read_manifest(src / MANIFEST_FILE)
    tensors, meta = _read_weights(src / WEIGHTS_FILE)
    if meta.get("format") != FORMAT or meta.get("version") != str(version):
        raise ValueError(f"{src}: weights (version {meta.get('version')}) do not match "
                         f"{MANIFEST_FILE} (version {version}); torn or mixed checkpoint")
    head = Eagle3Head(config, init=False)
    _check_state(head, tensors, src)
    _check_d2t(tensors["d2t"], config.target_vocab_size)
    head.load_state_dict(tensors)
    head.t2d = target_to_draft(head.d2t, config.target_vocab_size)
    head.version = version
    head.heldout_alpha, head.heldout_width = heldout_alpha, heldout_width
    return head.to(device=device, dtype=dtype)


def _read_manifest(path: Path) -> tuple[Eagle3Config, int, tuple[float, ...] | None, int | None]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read draft head manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {manifest.get('format_version')!r}"
                         f" (expected {FORMAT_VERSION})")
    version = manifest.get("version")
    if not isinstance(version, int) or version < 0:
        raise ValueError(f"{path}: version must be a non-negative integer, got {version!r}")
    try:
        config = Eagle3Config(**manifest["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid config: {e}") from e
    alpha = manifest.get("heldout_alpha")  # optional: older manifests have none
    if alpha is not None and not (
            isinstance(alpha, list) and alpha
            and all(type(a) in (int, float) and 0.0 <= a <= 1.0 for a in alpha)):
        raise ValueError(f"{path}: heldout_alpha must be a non-empty list of probabilities, "
                         f"got {alpha!r}")
    width = manifest.get("heldout_width")  # optional too
    if width is not None and not (type(width) is int and width >= 1):
        raise ValueError(f"{path}: heldout_width must be an integer >= 1, got {width!r}")
    return (config, version, tuple(float(a) for a in alpha) if alpha is not None else None,
            width)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"cannot read draft head weights {path}: {e}") from e


def _check_state(head: Eagle3Head, tensors: dict[str, torch.Tensor], src: Path) -> None:
    expected = head.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{src}: missing tensors {missing}, unexpected tensors {extra}")
    for name, ref in expected.items():
        got = tensors[name]
        if got.shape != ref.shape:
            raise ValueError(f"{src}: {name} has shape {tuple(got.shape)}, the config needs "
                             f"{tuple(ref.shape)}")
        if got.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise ValueError(f"{src}: {name} has dtype {got.dtype}, expected {ref.dtype}")
