"""Flywheel data path and loss: records -> windows -> packed batch; the training-time-test unroll
reproduces the drafter's serving-time chains exactly; KL restricted to the draft vocabulary."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from aurora_spec.flywheel.batch import Window, WindowAssembler, pack_windows
from aurora_spec.flywheel.config import TrainerConfig
from aurora_spec.flywheel.losses import (
    Embedder,
    TargetHead,
    acceptance_lengths,
    flywheel_loss,
    loss_rows,
    target_top,
    unrolled_forward,
)
from aurora_spec.flywheel.trainer import Trainer
from aurora_spec.flywheel.vocab import DraftIds
from aurora_spec.flywheel.traces import TraceBuffer
from tests.flywheel_helpers import assemble, full_rows, run_engine
from tests.tiny_models import head_for, tiny_target


def test_unrolled_forward_reproduces_serving_chains():
    model, _ = tiny_target("llama", seed=1)
    head = head_for(model)
    prompt = [5, 9, 17, 33, 4, 60]
    seq, records, traces, runner = run_engine(model, head, prompt)
    fused, final = full_rows(runner, seq[:-1])
    win = Window("r", None, 0, seq, torch.cat((fused, final), -1))
    batch = pack_windows([win])
    depth = 4
    with torch.no_grad():
        un = unrolled_forward(head, batch, Embedder(model.embed.weight), depth)
    preds = [head.d2t[lg.argmax(-1)] for lg in un.logits]
    checked = 0
    for c, proposal, m in traces:
        for d in range(1, min(m + 1, len(proposal)) + 1):
            i = c - 1 + d - 1
            assert bool(un.valid[d - 1][i])
            assert int(preds[d - 1][i]) == proposal[d - 1], (c, d)
            checked += 1
    assert checked > 20
    # acceptance_lengths judged on the emitted tokens equals what the verifier accepted.
    lengths = acceptance_lengths(head, batch, Embedder(model.embed.weight), depth)
    for c, proposal, m in traces:
        if len(proposal) == depth:
            assert int(lengths[c - 1]) == m


def test_tree_acceptance_lengths_equal_what_serving_trees_got_accepted():
    """The gate scores as serving drafts: with ``width`` 3 the offline measure of every draft
    point equals the accepted length of the top-3 tree Eagle3Drafter proposed there."""
    model, _ = tiny_target("llama", seed=1)
    head = head_for(model)
    prompt = [5, 9, 17, 33, 4, 60]
    depth, width = 4, 3
    seq, _, traces, runner = run_engine(model, head, prompt, max_tokens=60, k=depth, tree=width)
    fused, final = full_rows(runner, seq[:-1])
    batch = pack_windows([Window("r", None, 0, seq, torch.cat((fused, final), -1))])
    embed = Embedder(model.embed.weight)
    with torch.no_grad():
        trees = acceptance_lengths(head, batch, embed, depth, width=width)
        chains = acceptance_lengths(head, batch, embed, depth)
    full = [(c, m) for c, proposal, m in traces if len(proposal) == depth * width]
    assert len(full) > 10 and sum(m > 0 for _, m in full) > 3
    for c, m in full:
        assert int(trees[c - 1]) == m, c
    assert bool((trees >= chains).all())  # a tree holds the chain as its first branch
    assert int(trees.sum()) > int(chains.sum())  # and its siblings hit where the chain missed


def test_records_assemble_into_windows_matching_a_full_forward():
    model, _ = tiny_target("llama", seed=2)
    head = head_for(model, seed=3)
    prompt = [7, 8, 9, 10]
    seq, records, traces, runner = run_engine(model, head, prompt, max_tokens=50)
    fused, final = full_rows(runner, seq[:-1])
    wins = assemble(records, window=16)
    assert len(wins) >= 3
    covered = 0
    for w in wins:
        n = w.rows.shape[0]
        assert w.tokens == seq[w.pos0:w.pos0 + n + 1]
        torch.testing.assert_close(w.rows[:, :fused.shape[1]], fused[w.pos0:w.pos0 + n],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(w.rows[:, fused.shape[1]:], final[w.pos0:w.pos0 + n],
                                   atol=1e-4, rtol=1e-4)
        covered += w.pairs
    assert covered == len(seq) - 1 - len(prompt) - 1  # every pair from the first root on
    # Branch rows: the target's hidden states of rejected drafts (checked by recomputing).
    batch = pack_windows(wins)
    assert batch.n_branch > 0
    w = next(w for w in wins if w.br_tok)
    par = w.br_parent[0]
    assert par >= 0
    branch_seq = seq[:w.pos0 + par + 1] + [w.br_tok[0]]
    bf, bfin = full_rows(runner, branch_seq)
    torch.testing.assert_close(w.br_rows[0, fused.shape[1]:], bfin[-1], atol=1e-4, rtol=1e-4)


def test_packed_windows_unroll_as_if_each_were_alone():
    """Windows packed into one batch never see each other (models/blocks.py keeps them
    apart): every window's logits at every depth, branches included, equal its own batch's."""
    model, _ = tiny_target("llama", seed=2)
    head = head_for(model, seed=3)
    _, records, _, _ = run_engine(model, head, [7, 8, 9, 10], max_tokens=50)
    wins = assemble(records, window=16)
    embed = Embedder(model.embed.weight)
    with torch.no_grad():
        packed = unrolled_forward(head, pack_windows(wins), embed, 3)
    c0 = b0 = 0
    for w in wins:
        with torch.no_grad():
            alone = unrolled_forward(head, pack_windows([w]), embed, 3)
        nc, nb = len(alone.logits[0]), len(alone.logits_b)
        for a, p, valid in zip(alone.logits, packed.logits, alone.valid):
            # (a query with no draft at that depth, valid False, takes any row as its input)
            torch.testing.assert_close(p[c0:c0 + nc][valid], a[valid], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.logits_b[b0:b0 + nb], alone.logits_b, atol=1e-5,
                                   rtol=1e-5)
        c0, b0 = c0 + nc, b0 + nb
    assert b0 > 0 and c0 == len(packed.logits[0])


def test_cached_target_top_ids_give_the_same_loss_and_follow_the_vocabulary():
    model, _ = tiny_target("llama", seed=1)
    head = head_for(model, std=0.02)
    _, records, _, _ = run_engine(model, head_for(model, seed=5), [3, 4, 5], max_tokens=60)
    wins = assemble(records, window=32)
    target, embed = TargetHead(model.lm_head.weight), Embedder(model.embed.weight)
    vd = len(head.d2t)
    cfg = TrainerConfig(loss_vocab=vd // 4, loss_top_k=2)
    trainer = Trainer(head, target, embed, cfg)
    trainer._cache_target_top(wins)
    cached = pack_windows(wins)
    assert cached.top_c is not None and cached.top_b is not None and len(cached.top_b) > 0
    assert torch.equal(cached.top_c, target.logits(cached.final_c, head.d2t).topk(2).indices)
    assert torch.equal(cached.top_b, target.logits(cached.final_b, head.d2t).topk(2).indices)
    plain = pack_windows([dataclasses.replace(w, target_top=None) for w in wins])
    assert plain.top_c is None
    losses = []
    for batch in (cached, plain):
        torch.manual_seed(7)  # the sampled negatives
        losses.append(flywheel_loss(head, batch, target, embed, 3, (1.0,), 0.5,
                                    loss_vocab=cfg.loss_vocab, loss_top_k=2).loss)
    assert torch.equal(losses[0], losses[1])
    kept = wins[0].target_top
    trainer._cache_target_top(wins)
    assert wins[0].target_top is kept  # cached: not recomputed
    computed = trainer.stats.target_top_windows
    # A rebuild that drops four of the cached top tokens: the cached ids are carried over to
    # the new vocabulary, naming the same target tokens, -1 for those it dropped; none recomputed.
    old_d2t, old_tops = trainer.head.d2t.clone(), [w.target_top[1] for w in wins]
    gone = old_d2t[torch.cat(old_tops).flatten().long()].unique()[:4]
    emitted = torch.tensor([t for w in wins for t in w.tokens])
    outside = (trainer.head.t2d < 0).nonzero().squeeze(1)
    outside = outside[~torch.isin(outside, emitted)][:4]  # new tokens no window emitted
    assert len(outside) == 4
    rebuilt = torch.cat((old_d2t[~torch.isin(old_d2t, gone)], outside)).sort().values
    trainer.vocab.maybe_rebuild = lambda t2d: rebuilt
    assert trainer.maybe_rebuild_vocab()
    new_d2t, new_t2d = trainer.head.d2t, trainer.head.t2d
    trainer._cache_target_top(wins)
    assert trainer.stats.target_top_windows == computed
    dropped = 0
    for win, old in zip(wins, old_tops):
        stamp, ids = win.target_top
        assert stamp == trainer.draft_ids.stamp == 1 and ids.shape == old.shape
        tokens = old_d2t[old.long()]
        kept = new_t2d[tokens] >= 0
        assert torch.equal(ids >= 0, kept)
        assert torch.equal(new_d2t[ids[kept].long()], tokens[kept])
        dropped += int((~kept).sum())
    assert dropped > 0  # the rebuild dropped some of the cached tokens: the -1 path ran
    # A rollback to a head of the vocabulary before the rebuild is one more rebuild to the
    # cached ids: they name the same target tokens in the restored vocabulary, or are recomputed
    restored = copy.deepcopy(trainer.head)
    restored.set_vocab(old_d2t)
    tops_now = [w.target_top[1] for w in wins]
    trainer.restart_from(restored)
    trainer._cache_target_top(wins)
    assert trainer.draft_ids.stamp == 2 and torch.equal(trainer.head.d2t, old_d2t)
    for win, before in zip(wins, tops_now):
        stamp, ids = win.target_top
        assert stamp == 2
        named = before >= 0
        tokens = new_d2t[before[named].long()]
        assert torch.equal(ids[named] >= 0, trainer.head.t2d[tokens] >= 0)
        back = ids[named] >= 0
        assert torch.equal(old_d2t[ids[named][back].long()], tokens[back])
    computed = trainer.stats.target_top_windows
    # ... and ids older than the rebuilds kept are recomputed
    trainer.draft_ids = DraftIds(len(new_t2d), keep=0)
    trainer.draft_ids.stamp = 3
    trainer._cache_target_top(wins)
    assert trainer.stats.target_top_windows == computed + len(wins)
    assert torch.equal(wins[0].target_top[1], target_top(target, wins[0].target_rows(),
                                                          old_d2t, 2).to(torch.int32))


def test_draft_ids_follow_rebuilds_and_refuse_windows_that_emitted_a_new_token():
    ids = DraftIds(target_vocab=10, keep=2)
    d2t = [torch.tensor(v) for v in ([1, 3, 5, 7], [1, 5, 7, 8], [0, 1, 5, 8])]
    ids.rebuilt(d2t[0], d2t[1])  # 3 dropped, 8 came in (stamp 1)
    ids.rebuilt(d2t[1], d2t[2])  # 7 dropped, 0 came in (stamp 2)
    cached = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)  # tokens 1, 3 / 5, 7 at stamp 0
    assert ids.carry(0, cached, tokens=[1, 5, 7]).tolist() == [[1, -1], [2, -1]]
    assert ids.carry(2, cached, tokens=[0]) is cached  # cached today: as is
    assert ids.carry(0, cached, tokens=[1, 8]) is None  # 8 came in after stamp 0: recompute
    assert ids.carry(1, torch.tensor([[3]], dtype=torch.int32), tokens=[8]).tolist() == [[3]]
    assert ids.carry(1, cached, tokens=[0, 1]) is None  # 0 came in after stamp 1
    ids.rebuilt(d2t[2], d2t[0])
    assert ids.carry(0, cached, tokens=[1]) is None  # three rebuilds back, two kept
    # follow: the vocabulary in use, whatever changed it; the same one is no rebuild
    assert ids.follow(d2t[0]) == 3 and ids.follow(d2t[0].clone()) == 3
    assert ids.follow(d2t[1]) == 4 and ids.carry(3, cached, tokens=[1]).tolist() == [[0, -1], [1, 2]]


def test_prompt_positions_join_the_request_windows():
    """A prefill record (the last prompt_rows prompt positions) is stitched to the verify steps:
    windows cover every pair from the first kept prompt position, long prompts are cut at the
    window size, and only pairs where serving drafts are scored."""
    model, _ = tiny_target("llama", seed=2)
    head = head_for(model, seed=3)
    prompt = [int(x) for x in torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(0))]
    seq, records, _, runner = run_engine(model, head, prompt, max_tokens=30, prompt_rows=36)
    assert records[0].prompt and records[0].pos == 4 and len(records[0].rows) == 36
    fused, final = full_rows(runner, seq[:-1])
    wins = assemble(records, window=16)
    covered, scored = 0, 0
    for w in wins:
        n = w.rows.shape[0]
        assert n <= 16 + 9  # prompt pieces close at the window size, steps add <= k + 1 rows
        assert w.tokens == seq[w.pos0:w.pos0 + n + 1]
        torch.testing.assert_close(w.rows, torch.cat((fused, final), -1)[w.pos0:w.pos0 + n],
                                   atol=1e-4, rtol=1e-4)
        assert w.prompt_rows == max(0, min(n, len(prompt) - w.pos0))
        covered += w.pairs
        scored += w.scored_pairs
    assert covered == len(seq) - 1 - 4 - 1  # every pair from position 4 on
    assert scored == len(seq) - 1 - (len(prompt) - 1) - 1  # from the prompt's last position on
    batch = pack_windows(wins)
    assert int(batch.scored_c.sum()) == scored
    assert bool((batch.pos_c[batch.scored_c] >= len(prompt) - 1).all())
    assert bool((batch.pos_c[~batch.scored_c] < len(prompt) - 1).all())
    # The gate's measure skips prompt-only windows (nothing there is scored) and counts the same
    unscored = [w for w in wins if not w.scored_pairs]
    assert unscored  # the 36 prompt rows fill two windows of 16 before the answer starts
    trainer = Trainer(head, TargetHead(model.lm_head.weight), Embedder(model.embed.weight))
    plain = acceptance_lengths(head.eval(), batch, Embedder(model.embed.weight), 4)
    assert trainer.offline_acceptance(trainer.live, wins, depth=4) == (
        float(plain[batch.scored_c].float().mean()), scored)


def test_loss_decreases_and_discard_term_is_optional():
    model, _ = tiny_target("llama", seed=1)
    head = head_for(model, std=0.02)
    seq, records, _, _ = run_engine(model, head_for(model, seed=5), [3, 4, 5], max_tokens=60)
    asm = WindowAssembler(window=32)
    wins = [w for r in records for w in asm.add(r)] + asm.flush()
    batch = pack_windows(wins)
    target = TargetHead(model.lm_head.weight)
    embed = Embedder(model.embed.weight)
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = flywheel_loss(head, batch, target, embed, 3, (1.0, 0.8, 0.6), 0.5)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert out.discard_kl == out.discard_kl  # not NaN: branches were used
    off = flywheel_loss(head, batch, target, embed, 3, (1.0,), 0.0)
    assert off.discard_kl != off.discard_kl  # NaN: discard part off
    assert all(0.0 <= t <= 1.0 for t in off.top1)
    quick = flywheel_loss(head, batch, target, embed, 3, (1.0,), 0.0, with_top1=False)
    assert all(t != t for t in quick.top1)  # NaN: not computed
    assert torch.equal(quick.loss, off.loss)  # the stat changes nothing that is trained


def test_loss_rows_keep_every_top_k_and_fill_with_others():
    torch.manual_seed(0)
    top = torch.randn(7, 100).topk(3, -1).indices
    rows = loss_rows(top, 100, 40)
    assert len(rows) == 40 and torch.equal(rows, rows.unique())  # sorted, no repeats
    assert set(top.flatten().tolist()) <= set(rows.tolist())
    assert len(loss_rows(top, 100, 5)) >= 7  # the top-k union is never cut to fit
    assert torch.equal(loss_rows(top, 100, 500), torch.arange(100))
    # ids carried over a vocabulary rebuild may be -1 (dropped); the emitted tokens always count
    carried = torch.tensor([[5, -1], [-1, -1]], dtype=torch.int32)
    assert loss_rows(carried, 100, 0, truth=torch.tensor([9, -1, 5])).tolist() == [5, 9]
    with pytest.raises(ValueError, match="loss_top_k"):
        TrainerConfig(loss_vocab=2048, loss_top_k=0)
    with pytest.raises(ValueError, match="loss_vocab"):
        TrainerConfig(loss_vocab=-1)


def test_loss_over_a_vocabulary_subset_is_the_full_logits_restricted_and_still_learns():
    model, _ = tiny_target("llama", seed=1)
    head = head_for(model, std=0.02)
    seq, records, _, _ = run_engine(model, head_for(model, seed=5), [3, 4, 5], max_tokens=60)
    asm = WindowAssembler(window=32)
    batch = pack_windows([w for r in records for w in asm.add(r)] + asm.flush())
    target = TargetHead(model.lm_head.weight)
    embed = Embedder(model.embed.weight)
    vd = len(head.d2t)
    rows = torch.arange(0, vd, 3)
    with torch.no_grad():
        full = unrolled_forward(head, batch, embed, 3)
        part = unrolled_forward(head, batch, embed, 3, vocab_rows=rows)
    for a, b in zip(full.logits, part.logits):
        torch.testing.assert_close(b, a[:, rows])
    torch.testing.assert_close(part.logits_b, full.logits_b[:, rows])
    # loss_vocab >= the draft vocabulary is the full loss, exactly.
    same = flywheel_loss(head, batch, target, embed, 3, (1.0,), 0.5, loss_vocab=vd)
    assert torch.equal(same.loss, flywheel_loss(head, batch, target, embed, 3, (1.0,), 0.5).loss)
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    before = float(flywheel_loss(head, batch, target, embed, 3, (1.0,), 0.0).loss.detach())
    for _ in range(30):
        out = flywheel_loss(head, batch, target, embed, 3, (1.0, 0.8, 0.6), 0.5,
                            loss_vocab=vd // 4, loss_top_k=2)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = float(flywheel_loss(head, batch, target, embed, 3, (1.0,), 0.0).loss.detach())
    assert after < 0.5 * before  # judged on the whole vocabulary


def test_trace_buffer_is_bounded_and_drops_oldest():
    model, _ = tiny_target("llama", seed=1)
    _, records, _, _ = run_engine(model, head_for(model), [1, 2, 3], max_tokens=30)
    size = records[0].nbytes
    buf = TraceBuffer(capacity_bytes=size * 5)
    for r in records:
        buf.append(r)
    assert buf.bytes <= buf.capacity and buf.dropped == len(records) - len(buf)
    kept = buf.drain()
    assert kept[-1] is records[-1]  # the newest survive
    assert buf.bytes == 0 and len(buf) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_trainer_keeps_attention_off_cudnn() -> None:
    """cuDNN's attention plans every new shape (~15 ms of CPU a call, docs/results/gpu.md "On a
    GPU") and every training batch has its own length: a trainer step's attention must not use
    it."""
    from aurora_spec.flywheel.losses import Embedder, TargetHead
    from aurora_spec.flywheel.trainer import Trainer

    model, _ = tiny_target("llama", seed=0)
    trainer = Trainer(head_for(model, draft_vocab=64), TargetHead(model.lm_head.weight.cuda()),
                      Embedder(model.embed.weight.cuda()), TrainerConfig(), device="cuda")
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with trainer._autocast():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before  # serving's choice is left alone
