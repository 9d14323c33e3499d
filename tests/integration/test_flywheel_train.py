"""`aurora train` and `aurora export` on the bundled model: a head fitted from a tiny traffic file
loads with --draft-weights and decodes losslessly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_cli import aurora

pytestmark = pytest.mark.integration


def test_train_then_generate_and_export(smollm2_dir: Path, tmp_path: Path) -> None:
    traffic = tmp_path / "traffic"
    traffic.mkdir()
    asks = ["Name three colors.", "Count from one to five.", "Name two planets.",
            "Say hello in French.", "List three fruits.", "Name a large ocean.",
            "What is two plus two?"]
    rows = [{"id": str(i), "domain": "chat", "source": "t", "prompt": p}
            for i, p in enumerate(asks)]
    (traffic / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "head"
    r = aurora("train", "--model", str(smollm2_dir), "--traffic", str(traffic), "--out", str(out),
               "--requests", "7", "--max-tokens", "12", "--epochs", "1", "--threads", "1",
               "--draft-vocab", "1024", "--batch-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert (out / "head.safetensors").is_file() and (out / "head.json").is_file()
    summary = json.loads((out / "train.json").read_text())
    assert summary["requests"] == 7 and summary["generated_tokens"] > 0
    # 1 request in 20 is held out (one at a random place in each block of 20 arrivals; with
    # seed 0, the third): the head's acceptance per depth on it goes into the manifest, to seed
    # serving's draft-length policy, with the width of the drafts it was measured on (serving's
    # default, top-3 trees).
    assert summary["heldout_pairs"] > 0, summary
    manifest = json.loads((out / "head.json").read_text())
    alpha = manifest["heldout_alpha"]
    assert len(alpha) == 4 and all(0.0 <= a <= 1.0 for a in alpha), alpha
    assert manifest["heldout_width"] == 3 and summary["heldout_width"] == 3
    outs = {}
    for drafter, extra in (("none", []), ("eagle3", ["--draft-weights", str(out)])):
        g = aurora("generate", "--model", str(smollm2_dir), "--drafter", drafter, *extra,
                   "--json", "--chat", "--max-tokens", "12", "--threads", "1",
                   "Name three colors.")
        assert g.returncode == 0, g.stderr
        outs[drafter] = json.loads(g.stdout)["token_ids"]
    assert outs["none"] == outs["eagle3"]
    e = aurora("export", str(out), "--out", str(tmp_path / "eagle3"))
    assert e.returncode == 0, e.stderr
    cfg = json.loads((tmp_path / "eagle3" / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 1024 and cfg["vocab_size"] == 49152


def test_train_bad_traffic_path_is_one_clear_line(tmp_path: Path) -> None:
    r = aurora("train", "--traffic", str(tmp_path / "nope"), "--out", str(tmp_path / "h"))
    assert r.returncode == 2 and "traffic path not found" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "h").exists()


def test_chat_template_default_follows_the_model(smollm2_dir: Path) -> None:
    """`aurora train` and `aurora bench` default to the chat template when the model has one and
    to plain text when it has none (gemma3-270m is a base model), instead of refusing to run."""
    from transformers import AutoTokenizer

    from aurora_spec.cli import UsageError, encode_prompt

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = "Name three colors."
    plain = encode_prompt(tok, prompt, chat=False)
    templated = encode_prompt(tok, prompt, chat=True)
    assert templated != plain
    assert encode_prompt(tok, prompt, chat=None) == templated
    tok.chat_template = None  # a base model's tokenizer
    assert encode_prompt(tok, prompt, chat=None) == plain
    with pytest.raises(UsageError, match="no chat template"):
        encode_prompt(tok, prompt, chat=True)
