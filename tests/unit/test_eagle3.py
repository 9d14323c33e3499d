"""Eagle3Head (cached forward == full causal forward, persistence, vocab) and Eagle3Drafter
(catch-up, chains, sampling q, trees, k = 0, swap) on a tiny random head."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aurora_spec.drafters.base import Drafter
from aurora_spec.drafters.eagle3 import Eagle3Drafter
from aurora_spec.drafters.eagle3_head import Eagle3Config, Eagle3Head
from aurora_spec.models.cpu_linear import packed_kernels_available
from aurora_spec.types import Proposal, SamplingParams, StepTrace, VerifyResult

H, V, VD = 32, 50, 40
CFG = Eagle3Config(hidden_size=H, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                   rms_norm_eps=1e-6, rope_theta=10000.0, draft_vocab_size=VD,
                   target_vocab_size=V, target_layers=(0, 1, 2))
GREEDY = SamplingParams()


def make_head(seed: int = 0, std: float = 0.5) -> Eagle3Head:
    # A larger std than day 0 so logits are far from uniform and argmax ties cannot happen.
    return Eagle3Head.random(CFG, seed=seed, std=std).eval()


def embed_matrix() -> torch.Tensor:
    return torch.randn(V, H, generator=torch.Generator().manual_seed(99))


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3 * H, generator=torch.Generator().manual_seed(seed))


class Seq:
    """Drives a drafter like the engine would, with fake target hidden states and a fake verifier
    that accepts ``accept`` drafts then emits a token of its own."""

    def __init__(self, drafter: Eagle3Drafter, prompt_len: int = 7, seed: int = 0) -> None:
        self.d, self.rid, self.seed = drafter, f"r{seed}", seed
        self.tokens = [(3 * i + seed) % V for i in range(prompt_len)] + [11]
        self.d.start(self.rid, self.tokens[:-1], self.tokens[-1], rows(prompt_len, seed))

    def step(self, k: int, accept: int, params: SamplingParams = GREEDY) -> Proposal:
        prop = self.d.propose(self.rid, list(self.tokens), k, params)
        accept = min(accept, len(prop))
        nodes = tuple(range(accept))
        nxt = (len(self.tokens) * 7) % V
        result = VerifyResult(nodes, prop.tokens[:accept], nxt, accept == len(prop), len(prop))
        ctx = len(self.tokens) - 1
        trace = StepTrace(self.rid, ctx, self.tokens[-1], prop, result,
                          rows(len(prop) + 1, 1000 + ctx), torch.zeros(len(prop) + 1, H))
        self.d.observe(trace)
        self.tokens += list(result.emitted)
        return prop


def reference_chain(head: Eagle3Head, embed: torch.Tensor, hid: torch.Tensor, toks: list[int],
                    k: int, first: int | None = None) -> list[int]:
    """Slow reference: full causal recompute (no cache) of every pair plus the speculative steps."""
    hidden = head.fuse(hid)
    emb = embed[torch.tensor(toks)]
    out: list[int] = []
    with torch.no_grad():
        for i in range(k):
            pos = torch.arange(len(hidden))[None]
            g, logits = head(hidden[None], emb[None], pos)
            d = int(logits[0, -1].argmax()) if i or first is None else first
            out.append(int(head.d2t[d]))
            hidden = torch.cat((hidden, g[0, -1:]))
            emb = torch.cat((emb, embed[out[-1]][None]))
    return out


def history(seq: Seq, prompt_len: int) -> tuple[torch.Tensor, list[int]]:
    """The committed (hidden, next token) pairs a Seq produced, rebuilt independently."""
    req = seq.d._requests[seq.rid]
    return req.hid[:req.n].clone(), seq.tokens[1:]


# ---- head ----

def test_cached_forward_matches_full_causal_forward():
    head = make_head(std=0.1)  # std 0.5 activations reach ~1e2: fp32 rounding would dominate
    gen = torch.Generator().manual_seed(1)
    t = 11
    hidden, emb = torch.randn(1, t, H, generator=gen), torch.randn(1, t, H, generator=gen)
    pos = torch.arange(t)[None]
    with torch.no_grad():
        ref_g, ref_logits = head(hidden, emb, pos)
        for splits in ([1] * t, [3, 4, 1, 3], [t]):
            cache = head.new_cache(chunk=4)  # small chunk: forces growth mid-sequence
            outs, logits, s = [], [], 0
            for n in splits:
                g, lg = head(hidden[:, s:s + n], emb[:, s:s + n], pos[:, s:s + n], cache)
                outs.append(g)
                logits.append(lg)
                s += n
            torch.testing.assert_close(torch.cat(outs, 1), ref_g, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.cat(logits, 1), ref_logits, atol=1e-5, rtol=1e-5)
            assert cache.length == t
        _, last = head(hidden, emb, pos, last_only=True)
        torch.testing.assert_close(last, ref_logits[:, -1:], atol=1e-5, rtol=1e-5)


def test_forward_trains_through_cache():
    head = make_head()
    cache = head.new_cache()
    x = torch.randn(1, 3, H)
    g, _ = head(x, x, torch.arange(3)[None], cache)
    _, logits = head(g[:, -1:], x[:, :1], torch.tensor([[3]]), cache)
    logits.sum().backward()  # appends with grad concatenate instead of writing in place
    assert head.qkv.weight.grad is not None


def test_from_target_llama_and_gemma3_dicts():
    llama = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9,
             "num_key_value_heads": 3, "intermediate_size": 1536, "num_hidden_layers": 30,
             "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}
    c = Eagle3Config.from_target(llama, draft_vocab_size=8192)
    assert (c.head_dim, c.num_kv_heads, c.target_layers) == (64, 3, (2, 15, 27))
    assert (c.draft_vocab_size, c.target_vocab_size, c.rope_theta) == (8192, 49152, 1e5)
    gemma = {"model_type": "gemma3", "text_config": {
        "hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "intermediate_size": 2048, "num_hidden_layers": 18, "vocab_size": 262144,
        "rope_parameters": {"full_attention": {"rope_theta": 1e6},
                            "sliding_attention": {"rope_theta": 1e4}}}}
    g = Eagle3Config.from_target(gemma, draft_vocab_size=32768)
    assert (g.head_dim, g.rope_theta, g.target_layers) == (256, 1e6, (2, 9, 15))


def test_from_target_transformers_config():
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=128, num_hidden_layers=4, vocab_size=100)
    c = Eagle3Config.from_target(hf, draft_vocab_size=1000)
    assert (c.head_dim, c.draft_vocab_size, c.target_layers) == (16, 100, (2, 2, 1))


def test_save_load_round_trip(tmp_path):
    head = make_head()
    head.set_vocab(torch.tensor([5, 1, 7, 30, 49, 0]))
    head.version = 12
    head.save(tmp_path)
    loaded = Eagle3Head.load(tmp_path)
    assert loaded.version == 12 and loaded.config == head.config
    assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)
    x = torch.randn(1, 5, H)
    with torch.no_grad():
        for a, b in zip(head(x, x, torch.arange(5)[None]), loaded(x, x, torch.arange(5)[None])):
            assert torch.equal(a, b)
    bf16 = Eagle3Head.load(tmp_path, dtype=torch.bfloat16)
    assert bf16.fc.weight.dtype == torch.bfloat16 and bf16.d2t.dtype == torch.long
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.safetensors"]
    assert loaded.heldout_alpha is None  # none measured: the policy starts from its prior
    head.heldout_alpha = (0.61, 0.5, 0.42)
    head.save(tmp_path)
    assert Eagle3Head.load(tmp_path).heldout_alpha == (0.61, 0.5, 0.42)
    assert Eagle3Head.load(tmp_path).heldout_width is None  # not recorded: older manifests
    head.heldout_width = 3
    head.save(tmp_path)
    assert Eagle3Head.load(tmp_path).heldout_width == 3


def test_rates_at_takes_held_out_rates_only_at_the_width_served():
    """A top-3 tree's depth-1 rate is far above a chain's: rates measured at another width
    than the one served would misprice every draft, so the policy starts from its generic
    prior then; rates without a recorded width (older manifests) are taken as they are."""
    head = make_head()
    assert head.rates_at(3) is None  # nothing measured
    head.heldout_alpha = (0.3, 0.2)
    assert head.rates_at(3) == (0.3, 0.2)  # width not recorded
    head.heldout_width = 1  # chains, as `aurora train` measured before session 61
    assert head.rates_at(1) == (0.3, 0.2) and head.rates_at(3) is None
    head.heldout_width = 3
    assert head.rates_at(3) == (0.3, 0.2) and head.rates_at(1) is None


def test_load_refuses_bad_checkpoints(tmp_path):
    make_head().save(tmp_path / "ok")
    weights = load_file(tmp_path / "ok" / "head.safetensors")
    manifest = json.loads((tmp_path / "ok" / "head.json").read_text())
    meta = {"format": "aurora-eagle3-head", "version": "0"}

    def variant(name: str, tensors=None, man=None, raw: bytes | None = None):
        d = tmp_path / name
        d.mkdir()
        if raw is not None:
            (d / "head.safetensors").write_bytes(raw)
        else:
            save_file(tensors if tensors is not None else weights, d / "head.safetensors", meta)
        if man is not None:
            (d / "head.json").write_text(man if isinstance(man, str) else json.dumps(man))
        return d

    cases = {
        "corrupt": variant("corrupt", man=manifest, raw=b"\x00garbage" * 10),
        "truncated": variant("truncated", man=manifest,
                             raw=(tmp_path / "ok" / "head.safetensors").read_bytes()[:200]),
        "no_manifest": variant("no_manifest"),
        "bad_json": variant("bad_json", man="{not json"),
        "missing_key": variant("missing_key", {k: v for k, v in weights.items() if k != "fc.weight"},
                               manifest),
        "wrong_shape": variant("wrong_shape", {**weights, "fc.weight": torch.zeros(H, 2 * H)},
                               manifest),
        "config_mismatch": variant("config_mismatch", man={
            **manifest, "config": {**manifest["config"], "hidden_size": 64}}),
        "bad_config": variant("bad_config", man={**manifest, "config": {"hidden_size": 3}}),
        "future_format": variant("future_format", man={**manifest, "format_version": 99}),
        "torn_version": variant("torn_version", man={**manifest, "version": 3}),
        "bad_d2t": variant("bad_d2t", {**weights, "d2t": torch.full((VD,), V + 5)}, manifest),
        "alpha_not_probability": variant("alpha_not_probability",
                                         man={**manifest, "heldout_alpha": [0.5, 1.5]}),
        "alpha_empty": variant("alpha_empty", man={**manifest, "heldout_alpha": []}),
        "alpha_text": variant("alpha_text", man={**manifest, "heldout_alpha": "0.5"}),
        "width_zero": variant("width_zero", man={**manifest, "heldout_width": 0}),
        "width_text": variant("width_text", man={**manifest, "heldout_width": "3"}),
    }
    for name, d in cases.items():
        with pytest.raises(ValueError):
            Eagle3Head.load(d)
            pytest.fail(f"{name} loaded")


def test_set_vocab_keeps_shared_rows():
    head = make_head()
    old = head.lm_head.weight.detach().clone()
    new = torch.tensor([3, 45, 0, 39, 41, 7])  # 45, 41 are new; 3, 0, 39, 7 were draft ids
    head.set_vocab(new)
    w = head.lm_head.weight
    assert w.shape == (6, H) and head.config.draft_vocab_size == 6
    for row, tid in enumerate(new.tolist()):
        expected = old[tid] if tid < VD else torch.zeros(H)
        assert torch.equal(w[row], expected)
        assert int(head.t2d[tid]) == row
    assert int((head.t2d >= 0).sum()) == 6
    with pytest.raises(ValueError):
        head.set_vocab(torch.tensor([1, 1]))
    with pytest.raises(ValueError):
        head.set_vocab(torch.tensor([V]))


# ---- drafter ----

def test_drafter_protocol_and_k0_does_not_run_head():
    head = make_head()
    calls = []
    head.register_forward_pre_hook(lambda *_: calls.append(1))
    fuse = head.fuse
    head.fuse = lambda x: (calls.append(1), fuse(x))[1]  # type: ignore[method-assign]
    d = Eagle3Drafter(head, embed_matrix())
    assert isinstance(d, Drafter) and d.name == "eagle3"
    seq = Seq(d)
    for _ in range(5):
        prop = seq.step(0, 0)
        assert len(prop) == 0 and prop.draft_probs is None
    assert not calls
    seq.step(3, 1)
    assert len(calls) == 2 + 2  # one fuse + one head forward for the catch-up, two more steps


def test_catch_up_in_one_go_equals_one_at_a_time():
    embed = embed_matrix()
    lazy, eager = Seq(Eagle3Drafter(make_head(), embed)), Seq(Eagle3Drafter(make_head(), embed))
    for _ in range(6):  # one emitted token per step, so both see the same history
        lazy.step(0, 0)  # pending pairs accumulate
        eager.step(2, 0)  # caught up one pair at a time
    req_l, req_e = lazy.d._requests[lazy.rid], eager.d._requests[eager.rid]
    assert lazy.tokens == eager.tokens and torch.equal(req_l.hid[:req_l.n], req_e.hid[:req_e.n])
    assert req_l.cache.length == 0
    a = lazy.d.propose(lazy.rid, lazy.tokens, 4, GREEDY)
    b = eager.d.propose(eager.rid, eager.tokens, 4, GREEDY)
    assert a.tokens == b.tokens
    n = req_l.n
    torch.testing.assert_close(req_l.cache.k[:, :, :n], req_e.cache.k[:, :, :n], atol=1e-5,
                               rtol=1e-5)


def test_long_backlog_restarts_the_context_at_the_last_pairs(monkeypatch):
    """A proposal after many pending pairs runs only the last MAX_CATCH_UP through the head (at
    their true positions), so a day-0 probe on a long prompt stays cheap."""
    from aurora_spec.drafters import eagle3

    monkeypatch.setattr(eagle3, "MAX_CATCH_UP", 5)
    head, embed = make_head(std=0.1), embed_matrix()
    seq = Seq(Eagle3Drafter(head, embed), prompt_len=12)
    req = seq.d._requests[seq.rid]
    prop = seq.d.propose(seq.rid, seq.tokens, 3, GREEDY)
    assert (req.start, req.cache.length) == (req.n - 5, 5)
    hid, toks = history(seq, 12)
    with torch.no_grad():
        pos = torch.arange(req.n - 5, req.n)[None]
        g, logits = head(head.fuse(hid[-5:])[None], embed[torch.tensor(toks[-5:])][None], pos)
    assert prop.tokens[0] == int(head.d2t[logits[0, -1].argmax()])
    for step in range(4):  # later steps keep the window's start and stay consistent
        seq.step(2, step % 2)
        assert req.start == 12 - 5 and req.n - req.cached <= 3
    tree = Seq(Eagle3Drafter(make_head(std=0.1), embed, tree_width=2), prompt_len=12)
    assert len(tree.step(3, 1)) == 6


@pytest.mark.skipif(not packed_kernels_available(), reason="no oneDNN packed linear")
def test_packed_serving_head_matches_plain_and_never_uses_stale_copies():
    """Serving heads run their linears from packed copies (Eagle3Head.use_cpu_kernels); the
    copies must give the plain head's logits, stay out of autograd, and die with their weight."""
    head = make_head()
    plain = copy.deepcopy(head)
    Eagle3Drafter(head, embed_matrix())  # the drafter packs the head it serves
    assert set(head._packed) == set(Eagle3Head._LINEARS) and not plain._packed
    assert not copy.deepcopy(head)._packed  # copies never carry the packed cache
    assert not Eagle3Drafter(plain, embed_matrix(), cpu_kernels=False).head._packed
    e, pos = torch.randn(1, 5, H, generator=torch.Generator().manual_seed(1)), torch.arange(5)[None]

    def logits(h: Eagle3Head) -> torch.Tensor:
        return h(h.fuse(rows(5, 1))[None], e, pos)[1]

    with torch.no_grad():
        torch.testing.assert_close(logits(head), logits(plain), atol=1e-4, rtol=1e-4)
    logits(head).sum().backward()  # with autograd: plain linears, gradients reach the weights
    assert head.qkv.weight.grad is not None and head.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for h in (head, plain):
            h.qkv.weight.mul_(-1.0)  # an in-place update (what an optimizer step does)
        torch.testing.assert_close(logits(head), logits(plain), atol=1e-4, rtol=1e-4)
    assert "qkv" not in head._packed and "lm_head" in head._packed
    head.set_vocab(torch.arange(V - VD, V))  # a new lm_head: its old copy must not be used
    plain.set_vocab(torch.arange(V - VD, V))
    with torch.no_grad():
        torch.testing.assert_close(logits(head), logits(plain), atol=1e-4, rtol=1e-4)
    assert "lm_head" not in head._packed


@pytest.mark.skipif(not packed_kernels_available(), reason="no oneDNN packed linear")
def test_bfloat16_copies_serve_the_rounded_head():
    """A float32 head served from bfloat16 copies (runtime.draft_kernels' ``packed bf16``)
    computes what its weights rounded to bfloat16 compute, and is repacked when the drafter's
    choice changes."""
    head = make_head(std=0.1)
    rounded = copy.deepcopy(head)
    with torch.no_grad():
        for name in Eagle3Head._LINEARS:
            w = getattr(rounded, name).weight
            w.copy_(w.bfloat16().float())
    drafter = Eagle3Drafter(head, embed_matrix(), bf16_weights=True)
    kernels = {copy_.kernel for _, _, copy_ in head._packed.values()}
    assert drafter.kernels == ("packed bf16, float32 head"  # what the bench records
                               if kernels == {"row kernel, bfloat16 weights"}
                               else "packed, float32 head")
    assert Eagle3Drafter(make_head(), embed_matrix(), cpu_kernels=False).kernels == (
        "F.linear, float32 head")
    e, pos = torch.randn(1, 5, H, generator=torch.Generator().manual_seed(1)), torch.arange(5)[None]

    def logits(h: Eagle3Head) -> torch.Tensor:
        return h(h.fuse(rows(5, 1))[None], e, pos)[1]

    with torch.no_grad():
        if kernels == {"row kernel, bfloat16 weights"}:  # where the row kernel builds
            torch.testing.assert_close(logits(head), logits(rounded), atol=1e-4, rtol=1e-4)
        drafter.bf16_weights = False
        drafter.pack(head)
        assert not any(c.bf16_weights for _, _, c in head._packed.values())
        assert drafter.kernels == "packed, float32 head"
        torch.testing.assert_close(logits(head), logits(copy.deepcopy(head)), atol=1e-4,
                                   rtol=1e-4)


def test_last_catch_up_counts_the_backlog_a_proposal_ran():
    """The engine's cost model reads this to skip one-off catch-ups (drafters/eagle3.py)."""
    seq = Seq(Eagle3Drafter(make_head(), embed_matrix()), prompt_len=9)
    seq.step(3, 2)
    assert seq.d.last_catch_up == 9  # the whole prompt (+ first token) at the first proposal
    seq.step(3, 1)
    assert seq.d.last_catch_up == 3  # steady drafting: the accepted tokens + the target's
    seq.step(0, 0)
    seq.step(0, 0)
    seq.step(1, 0)
    assert seq.d.last_catch_up == 2 + 1 + 1  # two skipped steps pile up


def test_chain_matches_slow_reference_and_uses_d2t():
    head, embed = make_head(), embed_matrix()
    head.set_vocab(torch.randperm(V, generator=torch.Generator().manual_seed(3))[:VD])
    seq = Seq(Eagle3Drafter(head, embed), prompt_len=9)
    for step in range(5):
        prop = seq.step(4, step % 3)
        assert len(prop) == 4 and prop.is_chain and prop.draft_probs is None
        assert set(prop.tokens) <= set(head.d2t.tolist())
    hid, toks = history(seq, 9)
    prop = seq.d.propose(seq.rid, seq.tokens, 5, GREEDY)
    assert list(prop.tokens) == reference_chain(head, embed, hid, toks, 5)
    again = seq.d.propose(seq.rid, seq.tokens, 5, GREEDY)  # nothing pending: same answer
    assert again.tokens == prop.tokens
    assert seq.d._requests[seq.rid].cache.length == seq.d._requests[seq.rid].n


def test_sampling_returns_the_exact_q():
    head, embed = make_head(std=0.05), embed_matrix()
    head.set_vocab(torch.arange(V - VD, V))  # draft vocab = last 40 target ids
    seq = Seq(Eagle3Drafter(head, embed))
    params = SamplingParams(temperature=0.7, seed=5)
    prop = seq.step(4, 2, params)
    probs = prop.draft_probs
    assert probs is not None and probs.shape == (4, V) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert (probs[:, : V - VD] == 0).all()
    assert all(probs[i, t] > 0 for i, t in enumerate(prop.tokens))
    # First row is exactly softmax(draft logits / T) of the slow reference, scattered via d2t.
    hid, toks = history(seq, 7)
    with torch.no_grad():
        _, logits = head(head.fuse(hid)[None], embed[torch.tensor(toks)][None],
                         torch.arange(len(toks))[None])
    q = torch.softmax(logits[0, -1] / 0.7, -1)
    prop2 = seq.d.propose(seq.rid, seq.tokens, 3, params)
    torch.testing.assert_close(prop2.draft_probs[0, V - VD:], q, atol=1e-6, rtol=1e-5)
    # Seeded requests draft reproducibly.
    other = Seq(Eagle3Drafter(head, embed))
    assert other.step(4, 2, params).tokens == prop.tokens


def test_tree_branches_are_greedy_chains():
    head, embed = make_head(), embed_matrix()
    tree, chain = Seq(Eagle3Drafter(head, embed, tree_width=3)), Seq(Eagle3Drafter(head, embed))
    for _ in range(3):
        t, c = tree.step(4, 0), chain.step(4, 0)
        assert len(t) == 12 and t.depths() == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
        assert t.tokens[0::3] == c.tokens  # branch 0 (top-1 first token) is the greedy chain
    hid, toks = history(tree, 7)
    t = tree.d.propose(tree.rid, tree.tokens, 3, GREEDY)
    first = int(tree.d.head.t2d[t.tokens[1]])
    assert list(t.tokens[1::3]) == reference_chain(head, embed, hid, toks, 3, first=first)
    hot = tree.d.propose(tree.rid, tree.tokens, 2, SamplingParams(temperature=1.0))
    assert hot.draft_probs is None and hot.tokens == t.tokens[:6]  # point-mass siblings
    # Observe a non-chain accepted path (branch 2, depths 1 and 2).
    result = VerifyResult((2, 5), (t.tokens[2], t.tokens[5]), 4, False, len(t))
    fused = rows(len(t) + 1, 77)
    ctx = len(tree.tokens) - 1
    tree.d.observe(StepTrace(tree.rid, ctx, tree.tokens[-1], t, result, fused,
                             torch.zeros(len(t) + 1, H)))
    req = tree.d._requests[tree.rid]
    assert torch.equal(req.hid[ctx:ctx + 3], fused[[0, 3, 6]])
    assert req.toks[ctx:ctx + 3].tolist() == [t.tokens[2], t.tokens[5], 4]


def test_swap_head_rebuilds_from_target_states():
    embed = embed_matrix()
    seq = Seq(Eagle3Drafter(make_head(0), embed))
    for i in range(4):
        seq.step(3, i % 2)
    new = make_head(1)
    new.version = 7
    seq.d.swap_head(new)
    prop = seq.d.propose(seq.rid, seq.tokens, 4, GREEDY)
    hid, toks = history(seq, 7)
    assert prop.draft_version == 7
    assert list(prop.tokens) == reference_chain(new, embed, hid, toks, 4)
    assert seq.d.propose(seq.rid, seq.tokens, 0, GREEDY).draft_version == 7


def test_finish_frees_state_and_bad_calls_raise():
    d = Eagle3Drafter(make_head(), embed_matrix())
    seq = Seq(d)
    with pytest.raises(ValueError):
        d.propose(seq.rid, seq.tokens[:-1], 2, GREEDY)  # not the sequence the drafter saw
    seq.step(2, 1)
    d.finish(seq.rid, seq.tokens)
    assert seq.rid not in d._requests
    with pytest.raises(KeyError):
        d.propose(seq.rid, seq.tokens, 2, GREEDY)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    head, embed = make_head(std=0.1), embed_matrix()
    cpu = Seq(Eagle3Drafter(head, embed))
    gpu = Seq(Eagle3Drafter(make_head(std=0.1).cuda(), embed.cuda()))
    for i in range(4):
        assert cpu.step(4, i % 3).tokens == gpu.step(4, i % 3).tokens
    prop = gpu.step(3, 1, SamplingParams(temperature=1.0, seed=1))
    assert prop.draft_probs.device.type == "cuda"
    torch.testing.assert_close(prop.draft_probs.sum(-1).cpu(), torch.ones(3))
