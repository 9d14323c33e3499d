"""The online loop end to end with the trainer in its own process (tiny random target): acceptance
rises on a repetitive stream while every output stays identical to target-only greedy; killing
the trainer leaves serving on its last good version and the watchdog restarts the trainer."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from aurora_spec.drafters.eagle3 import Eagle3Drafter
from aurora_spec.flywheel.config import LearnerConfig, TrainerConfig
from aurora_spec.flywheel.learner import OnlineLearner
from aurora_spec.types import SamplingParams
from tests.tiny_models import head_for, tiny_target
from tests.flywheel_helpers import make_engine

PARAMS = SamplingParams(max_tokens=48)


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def online(request, tmp_path_factory):
    """Serving on the CPU, or on a GPU where there is one (skipped elsewhere); the trainer
    process takes a GPU wherever there is one (LearnerConfig.trainer_device auto)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, _ = tiny_target("llama", seed=0)
    model = model.to(request.param)
    head = head_for(model, std=0.02, draft_vocab=64).to(request.param)
    drafter = Eagle3Drafter(head, model.embed.weight)
    engine = make_engine(model, drafter)
    cfg = LearnerConfig(
        checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")),
        trainer=TrainerConfig(batch_tokens=256, window=64, publish_every=10, holdout_every=4,
                              gate_min_positions=16, vocab_min_tokens=64),
        rollback_min_steps=10_000, watchdog_s=0.2, restart_backoff_s=0.1)
    learner = OnlineLearner(model, engine, cfg)
    assert engine.trace_sink == learner.trace_sink
    base = make_engine(model, None)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (8,), generator=g).tolist() for _ in range(4)]
    want = {tuple(p): list(base.generate(p, PARAMS).token_ids) for p in prompts}
    threads = torch.get_num_threads()
    learner.start()
    yield learner, engine, drafter, prompts, want
    learner.stop()
    torch.set_num_threads(threads)  # the learner set serving's share from this (engine) thread


def test_online_loop_raises_acceptance(online):
    learner, engine, drafter, prompts, want = online
    taus = []
    deadline = time.monotonic() + 150
    i = 0
    while time.monotonic() < deadline:
        p = prompts[i % len(prompts)]
        out = engine.generate(p, PARAMS)
        assert list(out.token_ids) == want[tuple(p)]  # swaps mid-generation stay lossless
        taus.append(out.stats.tau)
        i += 1
        if learner.live_version >= 1 and i >= 8 and sum(taus[-4:]) / 4 > 2.0:
            break
        time.sleep(0.05)  # traffic pace: lets the trainer process run
    st = learner.status()
    assert st["live_version"] >= 1, st
    assert taus[0] == pytest.approx(1.0, abs=0.2)
    assert sum(taus[-4:]) / 4 > 2.0, taus
    assert st["swaps"] >= 1 and st["dropped_traces"] == 0 and st["recorded_traces"] > 0
    assert st["trainer_step"] > 0 and st["vocab_coverage"] > 0.9
    # The live version is on disk; a newer one may be too: a candidate is saved before it swaps in
    ckpt = [v for v, _ in learner.store.versions()]
    assert st["live_version"] in ckpt and ckpt[0] >= st["live_version"], (ckpt, st)


def test_the_trainer_judges_a_swap_on_traffic_served_since(online):
    """The paired rollback test runs in the trainer process: asked about the live version
    against the previous one, it scores both on the traffic that arrived since the live one was
    frozen and sends its verdict back (serving ignores it here: nothing is suspect)."""
    learner, engine, drafter, prompts, want = online
    learner.pause()  # no new candidate meanwhile: the live version stays the newest
    try:
        # ... once the trainer has taken the pause and a candidate it sent before is settled
        assert learner.wait_for(lambda st: st.get("trainer_paused")
                                and st.get("pending_candidate") is None, 60)
        live, previous = learner.live_version, learner.publisher.previous
        assert previous is not None and previous.version < live
        for p in prompts:
            assert list(engine.generate(p, PARAMS).token_ids) == want[tuple(p)]
        time.sleep(1.5)  # the trainer closes the open windows after a second without traffic
        assert learner.publisher.judge is not None
        assert learner.publisher.judge(live, previous.version)
        assert learner.wait_for(lambda st: (st.get("last_verdict") or {}).get("version") == live, 60)
        v = learner.status()["last_verdict"]
        assert v["keep"] is not None and v["positions"] >= 16, v
        assert v["keep"] == (v["new"] >= v["previous"]) and "fresh positions" in v["detail"]
        assert learner.live_version == live and learner.status()["rollbacks"] == 0
    finally:  # the next test needs a trainer that trains, whatever happened here
        learner.resume()


def test_killing_the_trainer_keeps_serving_and_restarts_it(online):
    learner, engine, drafter, prompts, want = online
    version = learner.live_version
    pid = learner.trainer_pid
    os.kill(pid, signal.SIGKILL)
    for p in prompts:  # serving goes on meanwhile, on the last good version, losslessly
        out = engine.generate(p, PARAMS)
        assert list(out.token_ids) == want[tuple(p)]
        assert drafter.head.version == version
    assert learner.wait_for(lambda s: s["trainer_restarts"] >= 1 and s["trainer_alive"]
                            and s["trainer_pid"] != pid, timeout=60)
    new_pid = learner.trainer_pid
    # The new trainer consumes traces again.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        engine.generate(prompts[0], PARAMS)
        st = learner.status()
        if st.get("pid") == new_pid and st.get("records", 0) > 0:
            break
        time.sleep(0.1)
    assert st.get("pid") == new_pid and st["records"] > 0, st
    assert drafter.head.version >= version


def test_reset_and_swap_now_reach_the_trainer_process(online):
    """The admin actions that only the trainer process carries out: a reset serves the head
    serving started with and empties the trainer's data; a swap request makes it judge a
    candidate at once instead of after ``publish_every`` steps. Outputs stay target-only's."""
    learner, engine, drafter, prompts, want = online
    learner.pause()  # no training meanwhile: only the requests below move the trainer
    try:
        assert learner.wait_for(lambda st: st.get("trainer_paused")
                                and st.get("pending_candidate") is None, 60)
        learner.reset()
        assert learner.live_version == 0
        assert learner.wait_for(lambda st: st.get("windows") == 0
                                and st.get("holdout_windows") == 0, 60), learner.status()
        for p in prompts * 2:  # held-out traffic for the gate (1 request in 4)
            assert list(engine.generate(p, PARAMS).token_ids) == want[tuple(p)]
            assert drafter.head.version == 0  # swapped in between engine steps
        time.sleep(1.5)  # the trainer closes the open windows after a second without traffic
        assert learner.wait_for(lambda st: st.get("holdout_windows", 0) > 0, 60)
        gates = learner.status()["gates"]
        assert learner.swap_now()
        assert learner.wait_for(lambda st: st.get("gates", 0) > gates, 60), learner.status()
    finally:
        learner.resume()


def tiny_eagle3_engine(version: int = 0, tree_width: int = 1):
    """A tiny target with an eagle3 engine; ``version`` > 0 stands for a trained head."""
    model, _ = tiny_target("llama", seed=0)
    head = head_for(model, std=0.02, draft_vocab=64)
    head.version = version
    drafter = Eagle3Drafter(head, model.embed.weight, tree_width=tree_width)
    return model, make_engine(model, drafter)


def test_serving_gets_the_trainers_core_back_while_it_rests(tmp_path, two_threads):
    """A CPU trainer takes one of serving's threads while it trains; when it rests (no candidate
    can beat the live head here: the gate margin is out of reach) serving gets it back, applied
    by the engine thread between steps."""
    model, engine = tiny_eagle3_engine()
    cfg = LearnerConfig(
        checkpoint_dir=str(tmp_path), trainer_device="cpu",
        trainer=TrainerConfig(batch_tokens=128, window=32, publish_every=2, holdout_every=2,
                              gate_min_positions=8, gate_margin=100.0, rest_after_rejections=1,
                              rest_min_windows=10_000, rest_wake_drop=100.0,
                              rest_wake_coverage=0.0, vocab_min_tokens=10_000),
        trainer_heap_buffers=False)
    learner = OnlineLearner(model, engine, cfg)
    prompt = list(range(3, 11))
    try:
        learner.start()
        assert not learner.trainer_idle  # auto, from a day-0 head: the trainer shares the cores
        assert learner.trainer_rests  # ... and rests, giving its core back
        assert learner.serving_threads() == 1
        assert learner.wait_for(lambda s: s.get("trainer_threads") == 1, timeout=60)
        assert learner.status()["heap_buffers"] is False  # glibc's defaults, as asked
        engine.generate(prompt, PARAMS)
        assert torch.get_num_threads() == 1  # the trainer trains on the other core
        deadline = time.monotonic() + 90
        while not learner.trainer_resting and time.monotonic() < deadline:
            engine.generate(prompt, PARAMS)
            time.sleep(0.05)
        assert learner.trainer_resting, learner.status()
        assert learner.serving_threads() == 2
        engine.generate(prompt, PARAMS)
        assert torch.get_num_threads() == 2
        learner.stop(save=False)
        assert learner.serving_threads() is None
    finally:
        learner.stop(save=False)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_an_idle_trainer_learns_on_idle_cpu_and_serving_keeps_every_thread(tmp_path,
                                                                          two_threads):
    """``trainer_idle`` (auto, serving from a trained head, version 1): the trainer process runs
    in the idle scheduling class (checked on the real process) and serving keeps both threads
    while it trains; it still trains and publishes (this test's traffic leaves the CPU idle
    between requests). It does not rest (auto): a trained head's trainer would otherwise start
    resting (``rest_when_trained``) and this test would never see version 2. Serving drafts
    top-3 trees, and the trainer's gate scores top-3 trees (``score_width`` 0: as served)."""
    model, engine = tiny_eagle3_engine(version=1, tree_width=3)
    cfg = LearnerConfig(
        checkpoint_dir=str(tmp_path), trainer_device="cpu",
        trainer=TrainerConfig(batch_tokens=256, window=64, publish_every=10, holdout_every=4,
                              gate_min_positions=16, vocab_min_tokens=64))
    learner = OnlineLearner(model, engine, cfg)
    prompt = list(range(3, 11))
    try:
        learner.start()
        assert learner.trainer_idle and learner.status()["trainer_idle"]
        assert learner.status()["trainer_rests"] is False
        assert learner.serving_threads() == 2
        assert learner.wait_for(lambda s: "priority" in s, timeout=60)  # the trainer is up
        assert learner.status()["priority"] == "SCHED_IDLE"
        assert learner.status()["heap_buffers"] is True  # the default (aurora_spec/memory.py)
        assert learner.status()["max_rss_mb"] > 0  # the trainer process's own peak memory
        assert learner.status()["score_width"] == 3
        # Auto threads: an idle-class trainer gets every thread (it only runs when they're free).
        assert learner.status()["trainer_threads"] == 2
        assert os.sched_getscheduler(learner.trainer_pid) == os.SCHED_IDLE
        deadline = time.monotonic() + 120
        while learner.live_version < 2 and time.monotonic() < deadline:
            engine.generate(prompt, PARAMS)
            assert torch.get_num_threads() == 2  # never handed to the trainer
            time.sleep(0.2)  # idle CPU between requests: the trainer's only time
        st = learner.status()
        assert st["live_version"] >= 2 and st["trainer_step"] > 0, st
        # Where the trainer's CPU went: steps and gates (a version went live) and the traces
        # it ingested, each counted once, so together no more than the process's total. (The
        # status comes every 0.5 s: wait for one sent after that gate.)
        assert learner.wait_for(lambda s: s.get("cpu_s", {}).get("gates", 0) > 0, timeout=10)
        cpu = learner.status()["cpu_s"]
        assert cpu["steps"] > 0 and cpu["gates"] > 0 and cpu["traces"] > 0, cpu
        parts = sum(v for k, v in cpu.items() if k != "total")
        assert parts <= cpu["total"] + 0.05, cpu
        # A bench request on this learner records the trainer's counters at its end: the gate
        # that put version 2 live is among them (once a status sent after it arrived).
        assert learner.wait_for(lambda s: s.get("candidates", 0) >= 1, timeout=10)
        from aurora_spec.bench.arms import EngineArm
        from aurora_spec.bench.online import OnlineArm

        out = OnlineArm(EngineArm("online", "online", engine, ()), learner, load=0.5).run(
            prompt, 8, "chat", "bench-0")
        c = out.trainer
        assert c is not None and c["steps"] > 0 and c["gates"] >= 1, c
        assert 0 <= c["refused"] < c["gates"], c
        assert set(c["last_gate"]) == {"passed", "candidate", "live", "positions"}, c
    finally:
        learner.stop(save=False)
