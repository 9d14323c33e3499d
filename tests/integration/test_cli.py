"""`aurora generate` end to end, and its bad-input contract: one clear line, non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def aurora(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aurora_spec.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_generate_json_matches_across_drafters(smollm2_dir: Path) -> None:
    outs = {}
    for drafter in ("none", "ngram", "eagle3"):
        r = aurora("generate", "--model", str(smollm2_dir), "--drafter", drafter, "--json",
                   "--chat", "--max-tokens", "16", "--threads", "1", "List three colors.")
        assert r.returncode == 0, r.stderr
        outs[drafter] = json.loads(r.stdout)
    assert outs["none"]["token_ids"] == outs["ngram"]["token_ids"] == outs["eagle3"]["token_ids"]
    stats = outs["none"]["stats"]
    assert set(stats) >= {"tau", "verify_steps", "accepted", "proposed", "tokens_per_s"}
    assert outs["none"]["text"].strip()


@pytest.mark.parametrize("args, needle", [
    (["--max-tokens", "0"], "max_tokens"),
    (["--max-tokens", "-3"], "max_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "/nonexistent/dir/model.gguf"], "not found"),
])
def test_bad_input_is_one_clear_line(args: list[str], needle: str, tmp_path: Path) -> None:
    r = aurora("generate", *args, "hello", cwd=tmp_path)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_corrupt_gguf_and_too_long_prompt(smollm2_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    r = aurora("generate", "--model", str(bad), "hi", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = aurora("generate", "--model", str(smollm2_dir), "--max-context", "64", "word " * 200)
    assert r.returncode != 0 and "context window" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
