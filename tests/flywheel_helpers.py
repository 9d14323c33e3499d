"""Shared set-up for the flywheel tests: a tiny-target engine, trace collection, records served
and assembled into windows, a trainer fitted on a repetitive stream."""

from __future__ import annotations

import torch

from aurora_spec.drafters.eagle3 import Eagle3Drafter
from aurora_spec.drafters.policy import PolicyConfig
from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.flywheel.batch import Window, WindowAssembler
from aurora_spec.flywheel.config import TrainerConfig
from aurora_spec.flywheel.losses import Embedder, TargetHead
from aurora_spec.flywheel.trainer import Trainer
from aurora_spec.flywheel.traces import pack, record_prefill, record_step, unpack
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.types import SamplingParams
from tests.tiny_models import head_for, tiny_target


def make_engine(model, drafter, sink=None, k=4) -> Engine:
    runner = TargetRunner(model, CacheConfig(max_slots=2, capacity=256))
    return Engine(runner, drafter, EngineConfig(PolicyConfig(max_draft=k, fixed_draft=k),
                                                calibrate=False), sink)


def collect_windows(model, trainer, prompts, head):
    recs = []
    engine = make_engine(model, Eagle3Drafter(head, model.embed.weight),
                         lambda t: recs.append(record_step(t)))
    for p in prompts:
        engine.generate(p, SamplingParams(max_tokens=48))
    trainer.ingest(recs)
    trainer.flush()


def trained_trainer(**cfg_changes):
    """A trainer that fitted 60 steps on a repetitive stream (tiny target): (model, head, it)."""
    torch.manual_seed(0)
    model, _ = tiny_target("llama", seed=0)
    head = head_for(model, std=0.02, draft_vocab=64)
    cfg = TrainerConfig(batch_tokens=256, window=32, holdout_every=3, gate_min_positions=16,
                        vocab_min_tokens=32, **cfg_changes)
    trainer = Trainer(head, TargetHead(model.lm_head.weight), Embedder(model.embed.weight), cfg)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (6,), generator=g).tolist() for _ in range(3)] * 4
    collect_windows(model, trainer, prompts, head)
    for _ in range(60):
        trainer.train_step()
    return model, head, trainer


def run_engine(model, head, prompt, max_tokens=40, k=4, tree=1, prompt_rows=0):
    """Serve one prompt with the head drafting ``k`` deep (``tree`` wide): the sequence, the
    trace records (``prompt_rows`` > 0: the prompt's too), (context, proposal, accepted) per
    step and the runner."""
    records, traces = [], []

    def sink(t):
        records.append(record_step(t, torch.float32, max_rejected=8))
        traces.append((t.context_len, t.proposal.tokens, t.result.num_accepted))

    engine = make_engine(model, Eagle3Drafter(head, model.embed.weight, tree_width=tree), sink, k)
    if prompt_rows:
        engine.prefill_sink = lambda t: records.append(record_prefill(t, torch.float32,
                                                                      prompt_rows))
    out = engine.generate(prompt, SamplingParams(max_tokens=max_tokens))
    return list(prompt) + list(out.token_ids), records, traces, engine.runner


def full_rows(runner, tokens):
    """The target's fused and final hidden rows of ``tokens`` from one prefill."""
    slot = runner.allocate()
    out = runner.prefill(slot, tokens)
    runner.release(slot)
    return out.fused_hidden[0], out.final_hidden[0]


def assemble(records, window: int) -> list[Window]:
    """Records through the inter-process transport, then into closed windows."""
    asm = WindowAssembler(window=window)
    wins = []
    for r in unpack(pack(records)):
        wins += asm.add(r)
    return wins + asm.flush()
