"""Versioned draft-head checkpoints: ``<root>/v000012/{head.safetensors, head.json}``.

Each version is written into a hidden temporary directory and renamed into place (atomic on one
filesystem), so a reader sees a whole checkpoint or none; the head files themselves are
safetensors + a small JSON manifest (Eagle3Head.save), never pickle. ``live.json`` records the
version serving uses. Loading refuses a corrupt, torn or incompatible checkpoint with a clear log
line; ``newest_valid`` then falls back to the previous version. A version that was rolled back is
renamed ``v000012.bad`` so a restart does not resume from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from aurora_spec.atomic_files import atomic_write_text
from aurora_spec.drafters.eagle3_head import Eagle3Config, Eagle3Head, target_to_draft

log = logging.getLogger(__name__)
_NAME = re.compile(r"^v(\d{6,})$")
LIVE_FILE = "live.json"


def version_dir(root: Path, version: int) -> Path:
    return root / f"v{version:06d}"


def check_fits(head: Eagle3Head, model: Any) -> None:
    """ValueError when ``head`` was not made for ``model`` (a DecoderModel)."""
    if model is None:
        return
    c, s = head.config, model.spec
    if (c.hidden_size, c.target_vocab_size, tuple(c.target_layers)) != (
            s.hidden_size, s.vocab_size, tuple(s.hidden_layers())):
        raise ValueError(f"incompatible draft head (hidden {c.hidden_size}, vocab "
                         f"{c.target_vocab_size}, layers {tuple(c.target_layers)}) for this target "
                         f"(hidden {s.hidden_size}, vocab {s.vocab_size}, layers "
                         f"{tuple(s.hidden_layers())})")


def head_to_payload(head: Eagle3Head) -> dict:
    """A picklable description of a head (for the trainer process): config, version, fp32 CPU
    tensors. Never written to disk (checkpoints use safetensors)."""
    return {"config": dataclasses.asdict(head.config), "version": int(head.version),
            "state": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
                      .clone() for k, v in head.state_dict().items()}}


def head_from_payload(p: dict, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> Eagle3Head:
    cfg = dict(p["config"])
    cfg["target_layers"] = tuple(cfg["target_layers"])
    head = Eagle3Head(Eagle3Config(**cfg), init=False)
    head.load_state_dict(p["state"])
    head.t2d = target_to_draft(head.d2t, head.config.target_vocab_size)
    head.version = int(p["version"])
    return head.to(device=device, dtype=dtype)


class CheckpointStore:
    def __init__(self, root: str | os.PathLike, keep: int = 5) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def save(self, head: Eagle3Head) -> Path:
        """Write ``head`` as its version's checkpoint (replacing one of the same version)."""
        final = version_dir(self.root, head.version)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{final.name}-"))
        try:
            head.save(tmp)
            if final.exists():
                old = final.with_name(f".old-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def versions(self) -> list[tuple[int, Path]]:
        """Checkpoint directories, newest first (rolled-back and temporary ones excluded)."""
        out = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    def max_version(self) -> int:
        """The highest version number ever written here (rolled-back ones included)."""
        best = -1
        for p in self.root.iterdir():
            m = re.match(r"^v(\d{6,})", p.name)
            if m:
                best = max(best, int(m.group(1)))
        return best

    @staticmethod
    def load(path: str | os.PathLike, model: Any = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Eagle3Head:
        """Load one checkpoint; ValueError (with the reason) when corrupt or incompatible."""
        head = Eagle3Head.load(path, device=device, dtype=dtype)
        check_fits(head, model)
        return head

    def newest_valid(self, model: Any = None, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Eagle3Head | None:
        for version, path in self.versions():
            try:
                head = self.load(path, model, device, dtype)
            except ValueError as e:
                log.warning("refusing checkpoint %s (version %d): %s; trying the previous one",
                            path, version, e)
                continue
            return head
        return None

    def mark_live(self, version: int) -> None:
        atomic_write_text(self.root / LIVE_FILE,
                          json.dumps({"live_version": version, "time": time.time()}))

    def live_version(self) -> int | None:
        try:
            return int(json.loads((self.root / LIVE_FILE).read_text())["live_version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def mark_bad(self, version: int) -> None:
        path = version_dir(self.root, version)
        if path.exists():
            os.replace(path, path.with_name(path.name + ".bad"))

    def prune(self) -> None:
        """Keep the newest ``keep`` versions and the live one."""
        live = self.live_version()
        for version, path in self.versions()[self.keep:]:
            if version != live:
                shutil.rmtree(path, ignore_errors=True)
