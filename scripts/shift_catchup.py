"""How fast does a trained head catch up after a traffic shift? An offline proxy for the wide-shift
benchmark (docs/results/shift.md, "Domain shift"), minutes instead of ~35, to choose what is worth
benching.

    python scripts/shift_catchup.py collect --out runs/catchup/traces.pt
    python scripts/shift_catchup.py fit runs/catchup/traces.pt --init runs/head-code \\
        --seconds 1.45 [--trainer '{"depth": 1}'] [--prompt-rows 64] [--steps 5 --burst 20:10]
        [--after-shift lr=1e-3,steps=150,fresh=1,at=0]
    python scripts/shift_catchup.py at-once runs/catchup/traces.pt --domain sql --init runs/head-chat
    python scripts/shift_catchup.py [--device cuda] speed runs/catchup/traces.pt \\
        [--init runs/head-code] [--trainer '{"batch_tokens": 128}'] [--profile] [--heap-buffers]

``collect`` generates target-only greedy answers (64 tokens, chat template) for a stream of
domains (default code:10,summarization:40,translation:40) and keeps the trace records serving
would (every verify step, the last 512 prompt positions; no rejected branches: target-only
decoding drafts nothing). ``fit`` starts the online trainer from ``--init`` (without it, a random
day-0 head) and feeds it the stream in order, the last ``--held`` requests of each domain after
the first held out (with ``--hold-first``, of the first too: does training on traffic the head
already knows make it worse there?); after each request it trains for ``--seconds`` of wall
time (equal CPU time for settings whose steps cost differently; ``--steps`` instead gives a
fixed number of steps; ``--after-shift`` changes the learning rate or the optimizer's moments
at a shift, see ``AfterShift``).
Every 5 requests it scores the current head on the current domain's held-out requests (the gate's
measure: mean accepted tokens of a greedy 4-token chain) and prints one JSON line with the
curves, their mean, the ``--init`` head's untrained score on each domain (``static``: what a
static arm would serve) and the mean's ratio to it (``vs_static``), with the run's CPU time
(``cpu_s``), vocabulary rebuilds and how many windows' target top ids were computed
(``target_top_windows``; the rest were cached). The curves score the trainee; with ``--gate``
the trainer also holds out 1 request in ``holdout_every`` and runs the gate every
``publish_every`` steps as serving does, and ``live_curves`` / ``live_mean`` score the head that
would be serving at the same points (``swaps``: domain:request of each version that went live):
how long the gate keeps a better trainee from serving after a shift. ``--cross`` adds ``cross``:
per domain trained on, the trainee's score on every held-out domain every 10 of its requests.
``at-once`` gives the trainer one domain's first ``--requests`` requests at once (no replay, no
order) and scores it on that domain's held-out requests every ``--every`` steps: how far so much
traffic can take a head. ``speed`` times the trainer's optimizer step (wall and CPU ms, after 3
warm-up steps) on the first 20 requests of the stream's first two domains; with ``--profile`` it also prints
torch.profiler's table of where a step goes, and with a ``loss_vocab`` in ``--trainer`` the
size of a batch's top-k union and the target mass it carries (``_top_k_share``);
``--heap-buffers`` times it with glibc keeping large buffers in the heap (aurora_spec/memory.py).
Run settings one at a time on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path

import torch

from aurora_spec.memory import keep_large_buffers_in_heap, peak_rss_mb


def _burst(text: str) -> tuple[int, int]:
    """``--burst REQUESTS:STEPS`` as two non-negative ints, or a clear usage error."""
    try:
        requests, steps = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected REQUESTS:STEPS, e.g. 20:10, got {text!r}") from None
    if requests < 0 or steps < 0:
        raise argparse.ArgumentTypeError(f"REQUESTS and STEPS must be >= 0, got {text!r}")
    return requests, steps


@dataclasses.dataclass
class AfterShift:
    """``--after-shift lr=X,steps=N,fresh=1,at=I``: at request ``at`` of each domain after the
    first (0: as the shift starts; a served shift watch notices one ~8 requests in), train the
    next ``steps`` optimizer steps at learning rate ``lr`` and, with ``fresh``, forget AdamW's
    moments: does a trained head learn new traffic faster from its first steps on it?"""
    lr: float | None = None
    steps: int = 0
    fresh: bool = False
    at: int = 0
    _left: int = 0  # boosted steps still to take
    _base_lr: float | None = None

    @classmethod
    def parse(cls, text: str) -> AfterShift:
        try:
            kv = dict(part.split("=") for part in text.split(","))
            got = cls(lr=float(kv.pop("lr")) if "lr" in kv else None,
                      steps=int(kv.pop("steps", 0)), fresh=kv.pop("fresh", "0") == "1",
                      at=int(kv.pop("at", 0)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected e.g. lr=1e-3,steps=150,fresh=1,at=0, "
                                             f"got {text!r}") from None
        if kv:
            raise argparse.ArgumentTypeError(f"unknown --after-shift keys: {sorted(kv)}")
        return got

    def start(self, trainer) -> None:
        if self.fresh:
            trainer.opt.state.clear()  # AdamW starts each parameter's state afresh
        self._left = self.steps if self.lr is not None else 0

    def before_step(self, trainer) -> None:
        """Set the learning rate of the coming step (trainer.lr too: a vocabulary rebuild makes
        a new optimizer from it)."""
        if self._base_lr is None:
            self._base_lr = trainer.lr
        trainer.lr = self.lr if self._left > 0 and self.lr is not None else self._base_lr
        for group in trainer.opt.param_groups:
            group["lr"] = trainer.lr
        self._left -= 1


def _stream(text: str) -> list[tuple[str, int]]:
    return [(d, int(n)) for d, n in (part.split(":") for part in text.split(","))]


def collect(a: argparse.Namespace) -> None:
    from aurora_spec.cli import encode_prompt, stop_token_ids
    from aurora_spec.engine.engine import Engine, EngineConfig
    from aurora_spec.flywheel.offline import collect as collect_traces
    from aurora_spec.flywheel.offline import read_traffic
    from aurora_spec.models.runner import CacheConfig, TargetRunner
    from aurora_spec.runtime import ModelConfig, load_target

    mcfg = ModelConfig(model=a.model, device=a.device)
    info, tok, model = load_target(mcfg)
    engine = Engine(TargetRunner(model, CacheConfig(1, mcfg.max_context)), None,
                    EngineConfig(calibrate=False))
    out: dict[str, list[dict]] = {}
    for domain, n in _stream(a.stream):
        rows = read_traffic(a.traffic, [domain])[a.skip:a.skip + n]
        prompts = ((encode_prompt(tok, r["prompt"], None)[-1500:], domain) for r in rows)
        got = collect_traces(engine, prompts, a.max_tokens, stop_token_ids(info, tok))
        out[domain] = [dataclasses.asdict(r) for r in got.records]
        print(f"{domain}: {n} requests, {got.output_tokens} tokens, {got.seconds:.0f} s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no runs/
    torch.save({"stream": a.stream, "records": out}, a.out)


def _held_windows(requests: list[list]) -> list:
    """The windows of ``requests``' answers (prompt rows are never drafted, so never scored)."""
    from aurora_spec.flywheel.batch import WindowAssembler

    asm = WindowAssembler(128)
    wins = [w for q in requests for r in q if not r.prompt for w in asm.add(r)]
    return wins + asm.flush()


def _requests(records: list[dict], prompt_rows: int) -> list[list]:
    """Trace records grouped by request (in order), prompt records cut to their last
    ``prompt_rows`` positions."""
    from aurora_spec.flywheel.traces import TraceRecord

    by: dict[str, list[TraceRecord]] = {}
    for d in records:
        r = TraceRecord(**d)
        if r.prompt and prompt_rows == 0:
            continue
        cut = len(r.tokens) - 1 - prompt_rows  # prompt positions beyond the last prompt_rows
        if r.prompt and cut > 0:
            r = dataclasses.replace(r, pos=r.pos + cut, tokens=r.tokens[cut:], rows=r.rows[cut:])
        by.setdefault(r.request_id, []).append(r)
    return list(by.values())


def _trainer(a: argparse.Namespace):
    """The online trainer from ``--init`` (None: a random day-0 head) with ``--trainer``
    overrides, on the model's device; no rest, and no hold-out from the stream unless ``--gate``
    asks the proxy to measure the gate too."""
    from aurora_spec.config import DrafterConfig
    from aurora_spec.drafters.eagle3_head import Eagle3Config, Eagle3Head
    from aurora_spec.flywheel.config import TrainerConfig
    from aurora_spec.flywheel.losses import Embedder, TargetHead
    from aurora_spec.flywheel.trainer import Trainer
    from aurora_spec.runtime import ModelConfig, load_target

    _, _, model = load_target(ModelConfig(model=a.model, device=a.device))
    holdout = {} if getattr(a, "gate", False) else {"holdout_every": 1 << 30}
    cfg = TrainerConfig(**{**holdout, "rest_after_rejections": 0, **json.loads(a.trainer)})
    if a.init:
        head = Eagle3Head.load(a.init, dtype=torch.float32)
    else:
        head = Eagle3Head.random(Eagle3Config.from_spec(model.spec, DrafterConfig().draft_vocab),
                                 seed=0)
    device = model.embed.weight.device
    return Trainer(head, TargetHead.from_model(model, device), Embedder.from_model(model, device),
                   cfg, device=device)


@torch.no_grad()
def _top_k_share(trainer, batches: int = 4) -> dict:
    """What ``loss_vocab`` keeps on these traces: the union of every position's ``loss_top_k``
    target tokens per training batch, and the share of the target's mass (over the draft
    vocabulary) they carry, means over ``batches`` sampled batches."""
    from aurora_spec.flywheel.batch import pack_windows

    c, unions, mass = trainer.cfg, [], []
    for _ in range(batches):
        b = pack_windows(trainer.store.sample(c.batch_tokens, c.recent_ratio),
                         with_branches=True).to(trainer.device)
        probs = trainer.target.logits(torch.cat((b.final_c, b.final_b)), trainer.head.d2t)
        top = probs.softmax(-1).topk(c.loss_top_k, dim=-1)
        unions.append(top.indices.unique().numel())
        mass.append(float(top.values.sum(-1).mean()))
    return {"loss_top_k": c.loss_top_k, "union_per_batch": round(sum(unions) / batches),
            "top_k_mass": round(sum(mass) / batches, 3)}


def speed(a: argparse.Namespace) -> None:
    data = torch.load(a.traces, weights_only=False)
    trainer = _trainer(a)
    for d in [d for d, _ in _stream(data["stream"])][:2]:
        for request in _requests(data["records"][d], a.prompt_rows)[:20]:
            trainer.ingest(request)
    trainer.flush()
    torch.manual_seed(0)
    cuda = trainer.device.type == "cuda"
    for _ in range(3):  # warm-up: allocator, autocast weight casts, optimizer state
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    t0, cpu0 = time.perf_counter(), time.process_time()
    sys0, faults0 = os.times().system, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(a.steps):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    # Page faults and kernel time per step: fresh large allocations cost both (glibc's
    # MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment change how many).
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    print(json.dumps({"trainer": json.loads(a.trainer), "threads": torch.get_num_threads(),
                      "device": str(trainer.device), "steps": a.steps,
                      "wall_ms": round((time.perf_counter() - t0) / a.steps * 1e3, 1),
                      "cpu_ms": round((time.process_time() - cpu0) / a.steps * 1e3, 1),
                      "system_ms": round((os.times().system - sys0) / a.steps * 1e3, 1),
                      "minor_faults": round(faults / a.steps),
                      "max_rss_mb": peak_rss_mb()}))
    if trainer.cfg.loss_vocab:
        print(json.dumps(_top_k_share(trainer)))
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts, record_shapes=True) as prof:
            for _ in range(5):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
        for sort in [a.sort] + (["self_device_time_total"] if cuda else []):
            print(prof.key_averages(group_by_input_shape=a.by_shape and not cuda).table(
                sort_by=sort, row_limit=25, max_name_column_width=40))


def fit(a: argparse.Namespace) -> None:
    data = torch.load(a.traces, weights_only=False)
    domains = [d for d, _ in _stream(data["stream"])]
    reqs = {d: _requests(data["records"][d], a.prompt_rows) for d in domains}
    held = {}
    for d in domains if a.hold_first else domains[1:]:  # scored on answers only, as served
        held[d] = _held_windows(reqs[d][-a.held:])
        reqs[d] = reqs[d][:-a.held]
    trainer = _trainer(a)
    # the --init head untrained on each domain: what the static arm would serve there
    static = {d: round(trainer.offline_acceptance(trainer.head, w)[0], 4) for d, w in held.items()}
    curves: dict[str, list[float]] = {d: [] for d in held}
    live: dict[str, list[float]] = {d: [] for d in held}  # --gate: the head serving would serve
    swaps: list[str] = []
    cross: dict[str, list[dict[str, float]]] = {d: [] for d in domains}  # --cross
    since_gate = 0
    owed, t0 = 0.0, time.perf_counter()  # owed: --steps not yet taken (fractions carry over)
    cpu0 = time.process_time()
    burst_requests, burst_steps = a.burst or (0, 0)
    for d in domains:
        for i, request in enumerate(reqs[d]):
            due_cross, due_curve = a.cross and i % 10 == 0, d in held and i % 5 == 0
            if due_cross or due_curve:
                cand = trainer.frozen_candidate()
                scores = {h: round(trainer.offline_acceptance(cand, w)[0], 4)
                          for h, w in held.items() if due_cross or h == d}
                if due_cross:
                    cross[d].append(scores)
            if due_curve:
                curves[d].append(scores[d])
                if a.gate:
                    live[d].append(round(trainer.offline_acceptance(trainer.live, held[d])[0], 4))
            trainer.ingest(request)
            trainer.flush()
            if a.after_shift and d != domains[0] and i == a.after_shift.at:
                a.after_shift.start(trainer)
            burst = d in held and i < burst_requests  # the first requests after a shift
            end = time.perf_counter() + a.seconds
            owed += burst_steps if burst else a.steps
            while trainer.can_train() and (time.perf_counter() < end if a.seconds else owed >= 1):
                if a.after_shift:
                    a.after_shift.before_step(trainer)
                trainer.train_step()
                owed -= 1
                since_gate += 1
                if a.gate and since_gate >= trainer.cfg.publish_every:
                    since_gate = 0
                    got = trainer.propose_candidate()
                    if got is not None:  # serving swaps it in at its next step
                        trainer.set_live(got[0])
                        swaps.append(f"{d}:{i}")
    for d in held:
        curves[d].append(round(trainer.offline_acceptance(trainer.frozen_candidate(), held[d])[0], 4))
    points = [x for c in curves.values() for x in c[:-1]]  # the catch-up, not the end state
    fixed = [static[d] for d, c in curves.items() for _ in c[:-1]]  # the same points, untrained
    mean, static_mean = sum(points) / max(len(points), 1), sum(fixed) / max(len(fixed), 1)
    gated = {}
    if a.gate:  # the catch-up as served: the live head's scores at the same points
        served = [x for c in live.values() for x in c]
        gated = {"live_curves": live, "swaps": swaps, "gates": trainer.stats.gates,
                 "live_mean": round(sum(served) / max(len(served), 1), 4),
                 "live_vs_static": round(sum(served) / max(len(served), 1)
                                         / max(static_mean, 1e-9), 3)}
    print(json.dumps({"trainer": json.loads(a.trainer), "prompt_rows": a.prompt_rows,
                      "burst": a.burst and ":".join(map(str, a.burst)),
                      "after_shift": a.after_shift and a.after_shift_text,
                      "steps": trainer.stats.steps, "seconds": round(time.perf_counter() - t0),
                      "cpu_s": round(time.process_time() - cpu0, 1),
                      "vocab_rebuilds": trainer.vocab.rebuilds,
                      "target_top_windows": trainer.stats.target_top_windows,
                      "curves": curves, "static": static, "mean": round(mean, 4),
                      "vs_static": round(mean / max(static_mean, 1e-9), 3), **gated,
                      **({"cross": cross} if a.cross else {})}))


def at_once(a: argparse.Namespace) -> None:
    """The first ``--requests`` requests of ``--domain`` given to the trainer all at once (no
    replay of other traffic, no arrival order), then ``--steps`` steps, scored on the domain's
    last ``--held`` requests every ``--every`` steps: how far that much traffic can take a head,
    next to how far the online trainee got after the same requests."""
    data = torch.load(a.traces, weights_only=False)
    reqs = _requests(data["records"][a.domain], a.prompt_rows)
    held = _held_windows(reqs[-a.held:])
    trainer = _trainer(a)
    for request in reqs[:min(a.requests, len(reqs) - a.held)]:
        trainer.ingest(request)
        trainer.flush()
    curve = []
    for step in range(a.steps + 1):
        if step % a.every == 0:
            score = trainer.offline_acceptance(trainer.frozen_candidate(), held)[0]
            curve.append([step, round(score, 4)])
        if step == a.steps or not trainer.can_train():
            break
        trainer.train_step()
    print(json.dumps({"domain": a.domain, "requests": a.requests, "init": a.init,
                      "trainer": json.loads(a.trainer), "steps": trainer.stats.steps,
                      "curve": curve}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (model and trainer)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--traffic", default="../shared/data/traffic")
    c.add_argument("--stream", default="code:10,summarization:40,translation:40")
    c.add_argument("--skip", type=int, default=100,
                   help="skip this many prompts per domain (runs/head-code saw the first 100 "
                   "code prompts)")
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--out", required=True)
    # What fit, at-once and speed share: the traces, the head to start from, the prompt rows.
    trained = argparse.ArgumentParser(add_help=False)
    trained.add_argument("traces")
    trained.add_argument("--init", default=None, help="the trained head to start from (default: a "
                         "random day-0 head)")
    trained.add_argument("--prompt-rows", type=int, default=512)
    f = sub.add_parser("fit", parents=[trained])
    f.add_argument("--held", type=int, default=10, help="held-out requests per later domain "
                   "(and of the first, with --hold-first)")
    f.add_argument("--hold-first", action="store_true",
                   help="hold out and score the first domain too (does training drift from it?)")
    f.add_argument("--seconds", type=float, default=1.45, help="training time per request")
    f.add_argument("--steps", type=float, default=0, help="steps per request (--seconds 0)")
    f.add_argument("--trainer", default="{}", help="TrainerConfig overrides, as JSON")
    f.add_argument("--burst", type=_burst, default=None, metavar="REQUESTS:STEPS",
                   help="with --steps: STEPS steps per request instead for the first REQUESTS "
                   "requests of each domain after the first (more compute right after a shift)")
    f.add_argument("--after-shift", dest="after_shift_text", default="",
                   metavar="lr=X,steps=N,fresh=1,at=I",
                   help="at request I of each later domain (default 0), train N steps at lr X "
                   "and/or (fresh=1) forget the optimizer's moments (AfterShift)")
    f.add_argument("--gate", action="store_true",
                   help="also run the gate as serving does (1 in holdout_every requests held out "
                   "from training, a candidate every publish_every steps, swapped in when it "
                   "passes) and score the live head at the same points: the catch-up as served")
    f.add_argument("--cross", action="store_true",
                   help="also score the trainee on every held-out domain every 10 requests of "
                   "each domain (with --hold-first: what training on one domain does to the others)")
    o = sub.add_parser("at-once", parents=[trained])
    o.add_argument("--domain", required=True)
    o.add_argument("--requests", type=int, default=30, help="the domain's first N requests")
    o.add_argument("--held", type=int, default=10, help="held-out requests (the domain's last)")
    o.add_argument("--steps", type=int, default=1200)
    o.add_argument("--every", type=int, default=100, help="score every N steps")
    o.add_argument("--trainer", default='{"reuse": 1000}',
                   help="TrainerConfig overrides, as JSON (default: reuse uncapped)")
    s = sub.add_parser("speed", parents=[trained])
    s.add_argument("--trainer", default="{}", help="TrainerConfig overrides, as JSON")
    s.add_argument("--steps", type=int, default=15, help="timed steps (after 3 warm-up ones)")
    s.add_argument("--profile", action="store_true", help="also profile 5 steps")
    s.add_argument("--by-shape", action="store_true",
                   help="profile rows per operator and input shape (default: per operator)")
    s.add_argument("--sort", default="self_cpu_time_total",
                   help="the profile table's order (torch.profiler key_averages().table sort_by)")
    s.add_argument("--heap-buffers", action="store_true",
                   help="glibc keeps large buffers in the heap, as the trainer process does "
                   "(aurora_spec/memory.py); without it glibc's defaults, unless "
                   "MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set")
    a = ap.parse_args()
    if a.cmd == "fit":
        try:
            a.after_shift = AfterShift.parse(a.after_shift_text) if a.after_shift_text else None
        except argparse.ArgumentTypeError as e:
            ap.error(f"--after-shift: {e}")
    if a.cmd == "fit" and a.burst and a.seconds:
        ap.error("--burst counts steps: use it with --seconds 0 --steps N")
    torch.set_num_threads(a.threads)
    if getattr(a, "heap_buffers", False) and not keep_large_buffers_in_heap():
        print("--heap-buffers: the C library refused (not glibc?); its defaults stay")
    {"collect": collect, "fit": fit, "at-once": at_once, "speed": speed}[a.cmd](a)


if __name__ == "__main__":
    main()
