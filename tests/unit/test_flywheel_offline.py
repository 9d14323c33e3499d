"""Offline fitting (aurora train's core), traffic reading, the vocabulary builder, EAGLE-3 export."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.flywheel.config import TrainerConfig
from aurora_spec.flywheel.export import export_eagle3
from aurora_spec.flywheel.offline import collect, fit, read_traffic
from aurora_spec.flywheel.vocab import VocabBuilder
from aurora_spec.models.runner import CacheConfig, TargetRunner
from tests.tiny_models import head_for, tiny_target


def test_read_traffic_interleaves_domains_and_filters(tmp_path):
    for dom, n in (("chat", 3), ("code", 2)):
        rows = [{"id": f"{dom}{i}", "domain": dom, "source": "t", "prompt": f"p\u2028{i}"}
                for i in range(n)]
        (tmp_path / f"{dom}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False)
                                                         for r in rows) + "\n")
    got = read_traffic(tmp_path)
    assert [r["id"] for r in got] == ["chat0", "code0", "chat1", "code1", "chat2"]
    assert [r["id"] for r in read_traffic(tmp_path, ["code"], limit=1)] == ["code0"]
    assert len(read_traffic(tmp_path / "chat.jsonl")) == 3


def test_a_rebuild_keeps_the_current_vocabulary_over_unseen_tokens():
    """Tokens the traffic has not shown yet tie at 0: a trained head's own vocabulary wins those
    ties (its rows were learned), not the lowest ids; without a current vocabulary, lowest ids."""
    vb = VocabBuilder(target_vocab=100, draft_vocab=10, threshold=0.9, min_tokens=4, window=50)
    t2d = torch.full((100,), -1)
    t2d[80:90] = torch.arange(10)  # a head trained on other traffic: tokens 80-89
    vb.observe([50, 51, 80])  # 50 and 51 are new; 80 was in the vocabulary already
    vb.observe([50, 51])
    d2t = vb.maybe_rebuild(t2d)
    assert d2t is not None
    # the three seen, then 7 more: the unseen tokens of the old vocabulary, lowest ids first
    assert d2t.tolist() == [50, 51, 80, 81, 82, 83, 84, 85, 86, 87]
    assert vb.build().tolist() == list(range(7)) + [50, 51, 80]


def test_vocab_builder_tracks_coverage_and_rebuilds():
    vb = VocabBuilder(target_vocab=100, draft_vocab=10, threshold=0.9, min_tokens=20, window=50)
    t2d = torch.full((100,), -1)
    t2d[:10] = torch.arange(10)
    vb.observe([50, 51, 52, 53] * 10)
    assert vb.coverage(t2d) == 0.0
    d2t = vb.maybe_rebuild(t2d)
    assert d2t is not None and {50, 51, 52, 53} <= set(d2t.tolist()) and len(d2t) == 10
    t2d2 = torch.full((100,), -1)
    t2d2[d2t] = torch.arange(10)
    assert vb.coverage(t2d2) == 1.0 and vb.maybe_rebuild(t2d2) is None
    # Prompt tokens weigh in the choice but not in coverage (measured on emitted tokens).
    vb.observe([90, 91] * 400, emitted=False)
    assert vb.coverage(t2d2) == 1.0 and vb.maybe_rebuild(t2d2) is None
    assert {90, 91} <= set(vb.build().tolist())
    # The coverage of the newest emitted tokens only (what a resting trainer wakes on).
    vb.observe([60, 61])  # outside the vocabulary
    assert vb.coverage(t2d2, newest=2) == 0.0 and vb.coverage(t2d2, newest=4) == 0.5
    assert vb.coverage(t2d2, newest=0) == 1.0 and vb.coverage(t2d2, newest=10**6) == 40 / 42
    # ... and of the tokens emitted since the vocabulary was built (out of sample): the two
    # emitted after the rebuild, where the window's coverage counts the 40 it was chosen from.
    assert vb.coverage_since_build(t2d2) == 0.0 and vb.built_at == 40
    fresh = VocabBuilder(target_vocab=100, draft_vocab=10)
    assert fresh.coverage_since_build(t2d2) != fresh.coverage_since_build(t2d2)  # NaN: none yet


def test_offline_fit_raises_heldout_acceptance():
    model, _ = tiny_target("llama", seed=0)
    engine = Engine(TargetRunner(model, CacheConfig(1, 256)), None, EngineConfig(calibrate=False))
    g = torch.Generator().manual_seed(1)
    prompts = [(torch.randint(3, 96, (6,), generator=g).tolist(), "d") for _ in range(6)] * 4
    got = collect(engine, iter(prompts), 40)
    assert got.output_tokens == 40 * len(prompts) and engine.trace_sink is None
    steps = [r for r in got.records if not r.prompt]
    assert all(len(r.rows) == 1 for r in steps)  # target-only: one row per step
    assert sum(r.prompt for r in got.records) == len(prompts)  # and each prompt's positions
    cfg = TrainerConfig(batch_tokens=128, window=32, holdout_every=5, lambda_discard=0.0)
    head, metrics = fit(model, got.records, got.prompt_tokens, cfg, epochs=6, draft_vocab=64)
    hist = metrics["history"]
    assert hist[-1]["heldout_acceptance"] > hist[0]["heldout_acceptance"] + 0.5
    assert head.version == 1 and head.config.draft_vocab_size == 64
    assert metrics["vocab_coverage"] == 1.0


def test_export_eagle3_layout(tmp_path):
    model, _ = tiny_target("llama", seed=0)
    head = head_for(model, seed=2)
    head.set_vocab(torch.tensor([5, 1, 90, 7] + list(range(10, 86))))
    head.version = 3
    export_eagle3(head, tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 80
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(head.config.target_layers)
    qkv = torch.cat([t[f"midlayer.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(qkv, head.qkv.weight)
    gate_up = torch.cat([t["midlayer.mlp.gate_proj.weight"], t["midlayer.mlp.up_proj.weight"]])
    assert torch.equal(gate_up, head.gate_up.weight)
    assert t["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * head.config.hidden_size
    assert torch.equal(t["d2t"] + torch.arange(80), head.d2t)
    assert t["t2d"].dtype == torch.bool and int(t["t2d"].sum()) == 80 and bool(t["t2d"][90])
    assert torch.equal(t["midlayer.input_layernorm.weight"], head.embed_norm.weight)


def test_init_from_target_copies_lm_head_rows():
    from aurora_spec.flywheel.losses import Embedder, TargetHead
    from aurora_spec.flywheel.trainer import Trainer

    model, _ = tiny_target("llama", seed=0)
    head = head_for(model, seed=1, draft_vocab=64)
    tr = Trainer(head, TargetHead.from_model(model), Embedder.from_model(model),
                 TrainerConfig(init_from_target=True, vocab_min_tokens=8))
    assert torch.equal(tr.head.lm_head.weight, model.lm_head.weight[tr.head.d2t])
    assert torch.equal(tr.head.norm.weight, model.norm.weight)
    assert not torch.equal(head.lm_head.weight, tr.head.lm_head.weight)  # a copy was changed
    tr.vocab.observe([90, 91, 92, 93, 94, 95] * 4)  # tokens outside the day-0 vocabulary
    assert tr.maybe_rebuild_vocab()
    row = int(tr.head.t2d[95])
    assert torch.equal(tr.head.lm_head.weight[row], model.lm_head.weight[95])
