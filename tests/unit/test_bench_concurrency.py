"""Concurrency sweep mechanics on a tiny target (no timing assertions)."""

from __future__ import annotations

from aurora_spec.bench.concurrency import closed_loop, concurrency_checks, run_concurrency
from aurora_spec.drafters.ngram import NgramDrafter
from aurora_spec.drafters.policy import PolicyConfig
from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.models.runner import CacheConfig, TargetRunner
from tests.tiny_models import tiny_target

PROMPTS = [[3 + i, 10 + i, 20 + i, 3 + i, 10 + i] for i in range(6)]


def build(model):
    def make(name: str, slots: int) -> Engine:
        drafter = NgramDrafter() if name == "ngram" else None
        return Engine(TargetRunner(model, CacheConfig(slots, 128)), drafter,
                      EngineConfig(PolicyConfig(max_draft=3), calibrate=False))
    return make


def test_closed_loop_keeps_level_in_flight_and_counts_every_token() -> None:
    model, _ = tiny_target("llama")
    engine = build(model)("ngram", 3)
    seen: list[int] = []
    original = engine.step

    def step() -> None:
        seen.append(len(engine.running) + len(engine.waiting) + engine._inbox.qsize())
        original()

    engine.step = step  # type: ignore[method-assign]
    res = closed_loop(engine, PROMPTS, level=3, max_tokens=9, stop_ids=())
    assert len(res.timings) == len(PROMPTS) and all(t.done for t in res.timings)
    assert sum(t.tokens for t in res.timings) == 9 * len(PROMPTS)
    assert max(seen) == 3  # never more than the level in flight
    s = res.summary()
    assert s["requests"] == 6 and s["aggregate_tokens_per_s"] > 0 and s["tpot_p50_s"] > 0


def test_run_concurrency_reports_every_level_and_arm() -> None:
    model, _ = tiny_target("llama")
    conc = run_concurrency(build(model), ["none", "ngram"], PROMPTS, [1, 4], 6, (),
                           progress=False)
    assert set(conc) == {"1", "4"} and set(conc["4"]) == {"none", "ngram"}
    for row in conc.values():
        for s in row.values():
            assert {"aggregate_tokens_per_s", "ttft_p50_s", "tpot_p50_s", "tpot_p99_s"} <= set(s)
    lines = concurrency_checks(conc)
    assert any("c=4 aggregate / c=1" in ln for ln in lines)
