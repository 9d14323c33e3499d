"""Greedy speculative decoding equals target-only greedy decoding, token for token (float32)."""

from __future__ import annotations

import pytest
import torch

from aurora_spec.drafters.hybrid import LookupHybrid
from aurora_spec.drafters.policy import PolicyConfig
from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.hardware import cpu_native_bf16
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.types import SamplingParams
from tests.scripted_drafter import ScriptedDrafter
from aurora_spec.models.cpu_linear import packed_kernels_available
from tests.tiny_models import tiny_target

VOCAB = 96


def reference_greedy(hf, prompt: list[int], max_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    """The slow reference: full recompute with transformers each token, no cache."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            tok = int(hf(torch.tensor([ids], device=hf.device)).logits[0, -1].argmax())
            if tok in stop:
                break
            out.append(tok)
            ids.append(tok)
    return out


def make_engine(model, drafter, fixed: int | None = 4) -> Engine:
    runner = TargetRunner(model, CacheConfig(max_slots=2, capacity=256))
    cfg = EngineConfig(PolicyConfig(max_draft=6, fixed_draft=fixed), calibrate=False)
    return Engine(runner, drafter, cfg)


@pytest.fixture(scope="module", params=["llama", "gemma3", "llama-cpu-kernels", "llama-cuda",
                                        "gemma3-cuda"])
def target(request):
    """``llama-cpu-kernels``: the oneDNN-packed linears that CPU serving uses (cpu_linear.py).
    ``-cuda``: the same tests on a GPU, where there is one (skipped elsewhere)."""
    kind = request.param.removesuffix("-cpu-kernels").removesuffix("-cuda")
    if request.param.endswith("-cuda") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, hf = tiny_target(kind, seed=3)
    if request.param.endswith("-cpu-kernels"):
        if not packed_kernels_available():
            pytest.skip("this PyTorch build has no oneDNN packed linear")
        model.use_cpu_kernels()
    if request.param.endswith("-cuda"):
        model, hf = model.to("cuda"), hf.to("cuda")
    return model, hf


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(1, 20, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def test_target_only_engine_matches_reference(target) -> None:
    model, hf = target
    engine = make_engine(model, None)
    for prompt in prompts(3, 0):
        got = engine.generate(prompt, SamplingParams(max_tokens=24))
        assert list(got.token_ids) == reference_greedy(hf, prompt, 24)
        assert got.stats.tau == 1.0


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("corrupt", [0.0, 0.2, 0.6, 1.0])
def test_scripted_drafts_are_lossless(target, tree: bool, corrupt: float) -> None:
    model, _hf = target
    base = make_engine(model, None)
    for i, prompt in enumerate(prompts(4, 10 + int(corrupt * 10))):
        max_tokens = [1, 7, 23, 40][i]
        want = list(base.generate(prompt, SamplingParams(max_tokens=max_tokens)).token_ids)
        drafter = ScriptedDrafter(prompt + want, VOCAB, seed=i, tree=tree, corrupt=corrupt,
                                  empty_every=5)
        engine = make_engine(model, drafter, fixed=[1, 3, 4, 6][i])
        got = engine.generate(prompt, SamplingParams(max_tokens=max_tokens))
        assert list(got.token_ids) == want
        assert len(got.token_ids) == max_tokens  # max tokens reached, also mid-draft
        if corrupt == 0.0 and max_tokens > 7:
            assert got.stats.tau > 2.0  # perfect drafts are accepted


def test_stop_token_inside_a_draft(target) -> None:
    """EOS in the middle of an accepted draft ends the request exactly where target-only does."""
    model, hf = target
    prompt = prompts(1, 99)[0]
    base = make_engine(model, None)
    free_run = list(base.generate(prompt, SamplingParams(max_tokens=30)).token_ids)
    stop = free_run[9]  # pretend this token is EOS
    params = SamplingParams(max_tokens=30, stop_token_ids=(stop,))
    want = list(base.generate(prompt, params).token_ids)
    assert want == free_run[:free_run.index(stop)]
    assert want == reference_greedy(hf, prompt, 30, (stop,))
    drafter = ScriptedDrafter(prompt + free_run, VOCAB, corrupt=0.0)
    got = make_engine(model, drafter, fixed=6).generate(prompt, params)
    assert list(got.token_ids) == want and got.finish_reason == "stop"


def test_interleaved_requests_equal_alone(target) -> None:
    """Several requests in flight, stepping in turn, each equals its solo run."""
    model, _ = target
    base = make_engine(model, None)
    ps = prompts(3, 5)
    solo = [list(base.generate(p, SamplingParams(max_tokens=12 + 5 * i)).token_ids)
            for i, p in enumerate(ps)]
    runner = TargetRunner(model, CacheConfig(max_slots=3, capacity=256))
    engine = Engine(runner, ScriptedDrafter([], VOCAB, corrupt=1.0),
                    EngineConfig(PolicyConfig(max_draft=4, fixed_draft=3), calibrate=False))
    seqs = [engine.add_request(p, SamplingParams(max_tokens=12 + 5 * i)) for i, p in enumerate(ps)]
    while engine.has_work:
        engine.step()
    assert [list(s.output) for s in seqs] == solo


@pytest.mark.parametrize("drafter_kind", ["none", "scripted-tree", "ngram", "eagle3"])
def test_batched_requests_join_and_leave(target, drafter_kind: str) -> None:
    """Requests of different lengths join at different steps and finish at different steps while
    sharing batched verify forwards; each output equals the request served alone."""
    model, _ = target
    base = make_engine(model, None)
    ps = prompts(5, 21)
    budgets = [5, 17, 9, 26, 12]
    solo = [list(base.generate(p, SamplingParams(max_tokens=m)).token_ids)
            for p, m in zip(ps, budgets, strict=True)]
    drafter = make_test_drafter(drafter_kind, model, ps[0] + solo[0])
    runner = TargetRunner(model, CacheConfig(max_slots=3, capacity=256))
    engine = Engine(runner, drafter, EngineConfig(PolicyConfig(max_draft=4, fixed_draft=3),
                                                  calibrate=False))
    seqs = [engine.add_request(ps[0], SamplingParams(max_tokens=budgets[0]))]
    step = 0
    while engine.has_work or len(seqs) < len(ps):
        if step in (1, 2, 4, 7) and len(seqs) < len(ps):  # later arrivals join a running batch
            i = len(seqs)
            seqs.append(engine.add_request(ps[i], SamplingParams(max_tokens=budgets[i])))
        engine.step()
        step += 1
    assert [list(s.output) for s in seqs] == solo


def make_test_drafter(kind: str, model, reference: list[int]):
    if kind == "none":
        return None
    if kind == "scripted-tree":
        return ScriptedDrafter(reference, VOCAB, tree=True, corrupt=0.3)
    if kind == "ngram":
        from aurora_spec.drafters.ngram import NgramDrafter

        return NgramDrafter()
    from aurora_spec.config import DrafterConfig
    from aurora_spec.runtime import make_drafter

    if kind == "eagle3-chain-fp32":
        return make_drafter(DrafterConfig("eagle3", draft_vocab=64, tree_width=1,
                                          draft_dtype="float32", lookup=False), model)
    if kind == "eagle3-nolookup":
        return make_drafter(DrafterConfig("eagle3", draft_vocab=64, lookup=False), model)
    if kind == "eagle3-bf16-head":  # what --draft-dtype auto may choose on native bfloat16
        return make_drafter(DrafterConfig("eagle3", draft_vocab=64, draft_dtype="bfloat16",
                                          lookup=False), model)
    if kind == "eagle3-bf16-copies":  # a float32 head served from bfloat16 row-kernel copies
        d = make_drafter(DrafterConfig("eagle3", draft_vocab=64, draft_dtype="float32",
                                       lookup=False), model)
        if model.embed.weight.device.type != "cpu" or not packed_kernels_available():
            pytest.skip("CPU kernels only")
        d.cpu_kernels, d.bf16_weights = True, True
        d.pack(d.head)
        return d
    # defaults: a tree, the auto dtype, a lookup chain merged in
    return make_drafter(DrafterConfig("eagle3", draft_vocab=64), model)


def test_eagle3_defaults_tree_and_draft_dtype(target) -> None:
    from aurora_spec.config import DrafterConfig
    from aurora_spec.runtime import make_drafter

    model, _ = target
    d = make_test_drafter("eagle3", model, [])
    bf16 = cpu_native_bf16() and model.embed.weight.device.type == "cpu"
    assert isinstance(d, LookupHybrid) and d.learned.tree_width == 3
    assert d.tree_width == 4  # the policy prices the lookup chain as one more branch
    # auto: the target's dtype, or on native bfloat16 whichever of a bfloat16 head and float32's
    # kernels times faster (runtime.draft_kernels), the bfloat16 head without packed kernels
    dtypes = {model.embed.weight.dtype}
    if bf16:
        dtypes = {torch.bfloat16} | (dtypes if packed_kernels_available() else set())
    assert d.head.fc.weight.dtype in dtypes
    if d.head.fc.weight.dtype == torch.bfloat16 and packed_kernels_available():
        assert d.learned.cpu_kernels and not d.learned.bf16_weights
    chain = make_test_drafter("eagle3-chain-fp32", model, [])
    assert chain.tree_width == 1 and chain.head.fc.weight.dtype == torch.float32
    assert not isinstance(make_test_drafter("eagle3-nolookup", model, []), LookupHybrid)
    with pytest.raises(ValueError, match="draft dtype"):
        make_drafter(DrafterConfig("eagle3", draft_vocab=64, draft_dtype="fp8"), model)


@pytest.mark.parametrize("drafter_kind", ["ngram", "eagle3", "eagle3-nolookup",
                                          "eagle3-chain-fp32", "eagle3-bf16-copies",
                                          "eagle3-bf16-head"])
def test_real_drafters_are_lossless(target, drafter_kind: str) -> None:
    model, _ = target
    base = make_engine(model, None)
    ps = prompts(3, 33)
    for p in ps:
        p += p  # repetition gives the n-gram drafter something to find
    want = [list(base.generate(p, SamplingParams(max_tokens=30)).token_ids) for p in ps]
    engine = make_engine(model, make_test_drafter(drafter_kind, model, []), fixed=4)
    got = [list(engine.generate(p, SamplingParams(max_tokens=30)).token_ids) for p in ps]
    assert got == want


def test_draft_cost_skips_one_off_catch_ups() -> None:
    """The first eagle3 proposal of a request runs the whole prompt through the head: that is not
    what a drafted token costs, so the cost model must not learn it (it would stop drafting)."""
    model, _ = tiny_target("llama", seed=3)
    engine = make_engine(model, make_test_drafter("eagle3", model, []), fixed=2)
    drafter, costs = engine.drafter, engine.costs
    backlogs, observed = [], []
    propose, observe = drafter.propose, costs.observe_draft

    def logged_propose(*a, **k):
        out = propose(*a, **k)
        backlogs.append(drafter.last_catch_up)
        return out

    def logged_observe(*a, **k):
        observed.append(backlogs[-1])
        return observe(*a, **k)

    drafter.propose, costs.observe_draft = logged_propose, logged_observe
    engine.generate(list(range(3, 23)), SamplingParams(max_tokens=12))
    assert backlogs[0] == 20 and len(backlogs) > 1
    assert observed == backlogs[1:]  # all but the prompt's catch-up (max_draft + 1 = 7 < 20)
    assert costs.draft_token_s > 0.0


@pytest.mark.parametrize("kind", ["eagle3", "eagle3-nolookup"])
def test_calibration_times_every_choosable_size_and_the_draft(kind) -> None:
    """The policy's costs come from measurements of what it can choose: chains of 1..k+1 tokens,
    the drafter's trees of w*k + 1 nodes, and the drafter's cost per depth. Calibrating leaves
    nothing behind: no request in the drafter, no slot taken, the lookup memory empty."""
    model, hf = tiny_target("llama", seed=3)
    drafter = make_test_drafter(kind, model, [])
    runner = TargetRunner(model, CacheConfig(max_slots=1, capacity=256))
    learned = getattr(drafter, "learned", drafter)
    calls: list[str] = []  # the order of target forwards and drafts while calibrating

    def logged(f, tag):
        def call(*a, **kw):
            calls.append(tag)
            return f(*a, **kw)
        return call

    runner.verify = logged(runner.verify, "forward")
    learned.propose = logged(learned.propose, "draft")
    engine = Engine(runner, drafter, EngineConfig(PolicyConfig(max_draft=5)))
    del runner.verify, learned.propose
    # Every timed draft follows a target forward, as in serving (where the forward evicts the
    # head's weights from the caches); only the prompt's catch-up comes first.
    first = calls.index("draft")
    assert calls.count("draft") > 1 and calls[:first].count("forward") > 0
    assert all(calls[i - 1] == "forward" for i in range(first + 1, len(calls))
               if calls[i] == "draft")
    w = engine.policy.cfg.tree_width
    assert w == (4 if kind == "eagle3" else 3)
    want = set(range(1, 7)) | {w * k + 1 for k in range(1, 6)}
    assert set(engine.costs.times) == want and all(t > 0 for t in engine.costs.times.values())
    assert engine.costs.draft_token_s > 0.0
    assert not learned._requests and runner.free_slots == 1
    if kind == "eagle3":
        assert drafter.lookup.stats()["entries"] == 0
    prompt = list(range(3, 23))
    got = engine.generate(prompt, SamplingParams(max_tokens=24)).token_ids
    assert list(got) == reference_greedy(hf, prompt, 24)


def test_costs_follow_the_thread_count_serving_runs_on() -> None:
    """The learner moves serving between one and two threads as its trainer takes or gives back
    a core: the engine's cost model learns a speed for each count it served on."""
    model, _ = tiny_target("llama", seed=3)
    engine = make_engine(model, None, fixed=None)  # every step verifies one token
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            engine.generate(list(range(3, 23)), SamplingParams(max_tokens=8))
    finally:
        torch.set_num_threads(before)
    assert set(engine.costs.speeds) == {1, 2}
    assert all(s > 0 for s in engine.costs.speeds.values())
