"""`aurora bench` end to end on the bundled SmolLM2: results.json structure, the report, and zero
greedy divergence from target-only in float32 (for ngram and for transformers' generate())."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aurora_spec.cli import main

pytestmark = pytest.mark.integration

PROMPTS = {
    "summarization": [
        "The city council met on Tuesday to discuss the new park. The park will have a pond, "
        "a playground and a garden. Work starts in May and ends in October.\n\nSummarize the "
        "text above in one sentence.",
        "Maria bought a red bicycle. She rides it to school every morning. On weekends she rides "
        "it to the lake with her brother.\n\nSummarize the text above.",
        "The factory reported record sales this quarter, driven by demand for electric motors. "
        "It plans to hire 200 workers.\n\nWrite a one-line summary.",
    ],
    "chat": [
        "Give me three tips for sleeping better.",
        "What is the capital of France?",
        "Write a haiku about the sea.",
    ],
}


def test_bench_end_to_end(smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                          ) -> None:
    traffic = tmp_path / "traffic"
    traffic.mkdir()
    for domain, prompts in PROMPTS.items():
        with (traffic / f"{domain}.jsonl").open("w") as f:
            for i, p in enumerate(prompts):
                f.write(json.dumps({"id": f"{domain}:{i}", "domain": domain, "source": "test",
                                    "prompt": p}) + "\n")
    out = tmp_path / "out"
    rc = main(["bench", "--arms", "none,ngram,hf,none@packed", "--requests", "2", "--max-tokens", "8",
               "--domains", "summarization,chat", "--traffic", str(traffic), "--threads", "1",
               "--warmup", "1", "--out", str(out), "--no-progress", "--save-token-ids"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "target-only engine vs transformers generate()" in printed

    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"config", "arms", "checks", "requests"}
    cfg = results["config"]
    assert cfg["dtype"] == "float32" and cfg["threads"] == 1 and cfg["max_tokens"] == 8
    assert cfg["model"] == "smollm2-135m" and cfg["chat"] is True and cfg["requests"] == 4
    assert cfg["command"].startswith("aurora bench") and "--arms none,ngram,hf" in cfg["command"]
    assert list(results["arms"]) == ["none", "ngram", "hf", "none@packed"]
    # none takes the faster target kernel for one row (F.linear, or packed where the row kernel
    # ties it); the exact reference is the first target-only arm on the packed kernels.
    kernels = cfg["target_kernels"]
    assert kernels["ngram"] == kernels["none@packed"] == "packed"
    assert kernels["none"] in ("plain", "packed")
    assert cfg["reference_arm"] == ("none" if kernels["none"] == "packed" else "none@packed")
    assert cfg["draft_kernels"] == {}  # no eagle3 arm here (test_eagle3: Eagle3Drafter.kernels)
    for name, arm in results["arms"].items():
        assert arm["requests"] == 4
        assert arm["tokens_per_s"] > 0 and arm["tokens_per_s_p10"] <= arm["tokens_per_s_p90"]
        assert set(arm["per_domain"]) == {"summarization", "chat"}
        assert arm["speedup_vs_none"] > 0 and arm["speedup_vs_hf"] > 0
        assert arm["diverged_requests"] == 0.0, (name, arm["first_divergence"])  # float32
        assert (arm["tau"] is None) == (name == "hf")
    assert results["arms"]["none"]["tau"] == 1.0 and results["arms"]["ngram"]["tau"] >= 1.0

    recs = results["requests"]
    assert len(recs) == 16
    by = {(r["arm"], r["index"]): r for r in recs}
    for i in range(4):
        ref = by[("none@packed", i)]["token_ids"]
        assert 0 < len(ref) <= 8 and 2 not in ref  # stop tokens never in the output
        for arm in ("ngram", "hf", "none"):
            assert by[(arm, i)]["token_ids"] == ref
    assert [by[("none", i)]["domain"] for i in range(4)] == ["summarization", "chat"] * 2
    statuses = {c["name"]: c["status"] for c in results["checks"]}
    lossless = [c for c in results["checks"] if c["name"] == "lossless"]
    assert any(c["text"].startswith(f"ngram greedy output vs {cfg['reference_arm']}")
               for c in lossless)
    assert all(c["status"] == "PASS" for c in lossless)
    assert statuses["engine_vs_hf"] in ("PASS", "FAIL")  # a figure, not a test, at 8 tokens

    md = (out / "report.md").read_text()
    assert cfg["command"] in md and "| `ngram` |" in md and "## Checks" in md
    assert (out / "bench.png").stat().st_size > 1000
