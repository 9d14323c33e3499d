"""Offline fitting: the "well-trained static speculator" baseline behind ``aurora train``.

Generate with the target alone from traffic prompts, record the same traces serving records,
build the draft vocabulary from prompt + output token frequencies, and train the head for a few
epochs with the online trainer's loss (replay = all windows, no recency). The result is an
ordinary head directory (head.safetensors + head.json) for ``--draft-weights``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from aurora_spec.drafters.eagle3_head import Eagle3Config, Eagle3Head
from aurora_spec.flywheel.batch import Window, WindowAssembler
from aurora_spec.flywheel.config import TrainerConfig
from aurora_spec.flywheel.losses import Embedder, TargetHead
from aurora_spec.flywheel.trainer import Trainer
from aurora_spec.flywheel.traces import TraceRecord, record_prefill, record_step
from aurora_spec.flywheel.vocab import VocabBuilder
from aurora_spec.types import SamplingParams

log = logging.getLogger(__name__)


def read_traffic(path: str | Path, domains: list[str] | None = None,
                 limit: int | None = None) -> list[dict]:
    """Prompts from a traffic directory (one ``<domain>.jsonl`` per domain) or one .jsonl file,
    interleaved across domains so any prefix is a mix."""
    p = Path(path)
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"no .jsonl traffic files in {p}")
    per: dict[str, list[dict]] = {}
    for f in files:
        for line in f.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            row = json.loads(line)
            dom = row.get("domain") or f.stem
            if domains and dom not in domains:
                continue
            per.setdefault(dom, []).append(row)
    if domains:
        missing = sorted(set(domains) - set(per))
        if missing:
            raise ValueError(f"no prompts for domain(s) {', '.join(missing)} in {p}")
    out: list[dict] = []
    iters = [iter(rows) for _, rows in sorted(per.items())]
    while iters and (limit is None or len(out) < limit):
        for it in list(iters):
            row = next(it, None)
            if row is None:
                iters.remove(it)
            elif limit is None or len(out) < limit:
                out.append(row)
    return out


def head_config_for(model: Any, draft_vocab: int) -> Eagle3Config:
    return Eagle3Config.from_spec(model.spec, draft_vocab)


@dataclass
class Collected:
    records: list[TraceRecord]
    prompt_tokens: list[int]
    output_tokens: int
    seconds: float


def collect(engine: Any, prompts: Iterator[tuple[list[int], str | None]], max_tokens: int,
            stop_ids: tuple[int, ...] = (), dtype: torch.dtype = torch.bfloat16,
            progress: Callable[[int, int], None] | None = None,
            prompt_rows: int = 512) -> Collected:
    """Generate target-only (greedy) and keep every verify step's record, and the last
    ``prompt_rows`` positions of each prompt (0: none)."""
    records: list[TraceRecord] = []
    engine.trace_sink = lambda t: records.append(record_step(t, dtype, max_rejected=0))
    if prompt_rows > 0:
        engine.prefill_sink = lambda t: records.append(record_prefill(t, dtype, prompt_rows))
    prompt_tokens: list[int] = []
    out_tokens, t0 = 0, time.perf_counter()
    for i, (ids, domain) in enumerate(prompts):
        res = engine.generate(ids, SamplingParams(max_tokens=max_tokens, stop_token_ids=stop_ids),
                              domain=domain)
        prompt_tokens += ids
        out_tokens += len(res.token_ids)
        if progress is not None:
            progress(i + 1, out_tokens)
    engine.trace_sink = engine.prefill_sink = None
    return Collected(records, prompt_tokens, out_tokens, time.perf_counter() - t0)


def fit(model: Any, records: list[TraceRecord], prompt_tokens: list[int],
        cfg: TrainerConfig, epochs: float, draft_vocab: int, init: Eagle3Head | None = None,
        device: str = "cpu", report: Callable[[dict], None] | None = None) -> tuple[Eagle3Head, dict]:
    """Train a head on recorded traces; returns it (version 1 more than ``init``) and metrics."""
    head = init if init is not None else Eagle3Head.random(head_config_for(model, draft_vocab),
                                                           seed=cfg.seed)
    vocab = VocabBuilder(model.spec.vocab_size, head.config.draft_vocab_size, window=1)
    vocab.observe(prompt_tokens)
    for r in records:
        if not r.prompt:  # prompt tokens are counted above
            vocab.observe(r.tokens[1:])
    vocab.recent.clear()  # all-time counts only
    vocab.threshold = 0.0  # one vocabulary for the whole fit
    head.set_vocab(vocab.build())
    emitted = torch.tensor([t for r in records if not r.prompt for t in r.tokens[1:]],
                           dtype=torch.long)
    coverage = float((head.t2d[emitted] >= 0).double().mean()) if len(emitted) else 1.0
    asm = WindowAssembler(cfg.window)
    windows: list[Window] = []
    for r in records:
        windows += asm.add(r)
    windows += asm.flush()
    # lr_trained=None: the lr asked for, whatever head the fit starts from
    cfg = replace(cfg, lr_trained=None, recent_ratio=0.0, reservoir_windows=max(len(windows), 1),
                  reservoir_bytes=None,
                  holdout_windows=max(len(windows), 1), reuse=float("inf"),
                  vocab_rebuild_coverage=0.0)
    target = TargetHead.from_model(model, device)
    embed = Embedder.from_model(model, device)
    trainer = Trainer(head, target, embed, cfg, device)
    trainer.vocab = vocab
    trainer.add_windows(windows)
    pairs = trainer.store.positions
    steps = max(1, int(epochs * pairs / cfg.batch_tokens))
    held = trainer.store.holdout_slice()
    start_acc, n_held = trainer.offline_acceptance(trainer.head, held)
    history = [{"step": 0, "heldout_acceptance": round(start_acc, 4)}]
    every = max(1, steps // max(1, int(round(epochs))) if epochs >= 1 else steps)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.train_step()
        if step % every == 0 or step == steps:
            acc, _ = trainer.offline_acceptance(trainer.head, held)
            row = {"step": step, "epoch": round(step * cfg.batch_tokens / max(pairs, 1), 2),
                   "loss": round(trainer.stats.loss, 4), "heldout_acceptance": round(acc, 4),
                   "seconds": round(time.perf_counter() - t0, 1)}
            history.append(row)
            if report is not None:
                report(row)
    out = trainer.head.eval()
    out.version = (init.version if init is not None else 0) + 1
    # The last evaluation above scored the final weights: its per-depth acceptance seeds the
    # draft-length policy of whoever serves this head (else it starts from a generic prior).
    out.heldout_alpha = tuple(round(a, 4) for a in trainer.last_alpha) if n_held else None
    out.heldout_width = trainer.score_width if n_held else None
    metrics = {"train_pairs": pairs, "heldout_pairs": n_held, "steps": steps,
               "step_ms": round(trainer.stats.step_ms, 1), "history": history,
               "vocab_coverage": round(coverage, 4), "draft_vocab": out.config.draft_vocab_size,
               "heldout_alpha": list(out.heldout_alpha or ()), "heldout_width": out.heldout_width}
    return out, metrics
