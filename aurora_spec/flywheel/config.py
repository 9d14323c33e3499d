"""Configuration of the flywheel: what is recorded, how the trainer learns, how versions go live.

Frozen dataclasses only; the learner, the trainer process and the CLI build them from code or flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TRACE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class TraceConfig:
    dtype: str = "bfloat16"  # storage dtype of recorded hidden rows (halves memory vs fp32)
    max_rejected: int = 8  # rejected-branch rows kept per verify step (0: none)
    buffer_bytes: int = 64 << 20  # serving-side buffer bound; the oldest records are dropped
    # Prompt positions recorded per request (prefill computed their hidden states anyway; the
    # last ones are kept); 0: learn from verify steps only. On the bundled model's chat / code /
    # math traffic prompts add ~2.8x the training pairs of 64-token outputs.
    prompt_rows: int = 512

    @property
    def torch_dtype(self) -> torch.dtype:
        return TRACE_DTYPES[self.dtype]


@dataclass(frozen=True)
class TrainerConfig:
    lr: float = 1e-3
    # The learning rate when the trainer starts from a head trained before serving (version > 0:
    # offline-fitted or resumed); None: lr. Why lower: trained on through traffic its head
    # already knows, the trainee drifts from that head at 1e-3. Chat -> SQL -> code proxy
    # (`scripts/shift_catchup.py fit runs/catchup-csc/traces.pt --init runs/head-chat --seconds 0
    # --steps 5 --hold-first`, seeds 0 and 1; `--trainer '{"lr_trained": null}'` for 1e-3): while
    # training on chat the trainee scored 0.196-0.199 on held-out chat at 5e-4, 0.166-0.169 at
    # 1e-3 (the chat head: 0.180), and the catch-up mean over SQL and code was 0.359-0.362
    # against 0.337-0.351; 1e-4 caught up slower. Served as fast as 1e-3 in the benchmark
    # (docs/results/shift.md, "Domain shift": the drift was not what delays the first version after
    # a shift).
    lr_trained: float | None = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    depth: int = 3  # training-time-test unroll depth (EAGLE-3)
    depth_weights: tuple[float, ...] = (1.0, 0.8, 0.64, 0.51, 0.41, 0.33, 0.26, 0.21)
    lambda_discard: float = 0.3  # weight of the KL at rejected-branch contexts (0 = off)
    # True: depth d >= 2 of the unroll runs only at the pairs whose draft serving would have
    # had accepted through depth d-1 (the emitted token among the depth-1 top score_width, then
    # the greedy token), the only places a verifier ever sees a depth-d draft; False: at every
    # pair (EAGLE-3's training-time test as published). Why: the deeper queries elsewhere cost
    # a forward and a backward for drafts no verifier sees; right after a shift nearly every
    # pair. A CPU step 1.54x cheaper from the chat head, 1.87x from a random one (AVX2-only
    # host, one thread). Off by default: two runs of each stream side by side served ties (the
    # shift 1.16x and 1.17x the static head against the default's 1.17x and 1.16x; day 0's last
    # 50 tau 2.21 at 1.27x and 2.25 at 1.36x against 2.28 at 1.41x and 2.18 at 1.35x;
    # docs/results/trainer.md, "Unrolling only the chains serving would have accepted";
    # @trainer.unroll_accepted=true).
    unroll_accepted: bool = False
    batch_tokens: int = 256  # committed positions per training step (packed)
    # > 0: each step's KL over at least this many draft ids (every position's loss_top_k target
    # tokens + uniformly sampled others, flywheel/losses.py loss_rows) instead of the whole draft
    # vocabulary: a cheaper step (the draft lm_head dominates a CPU step; 2048 of 8192: 0.67x the
    # CPU, 388 against 580 ms on one thread, `scripts/shift_catchup.py --threads 1 speed` as is
    # and with `--trainer '{"loss_vocab": 0}'`); 0: the whole vocabulary. Why 2048 by default:
    # no run measured it serving a lower tau, and a trainer that shares serving's cores takes a
    # third less CPU per step. Day 0 side by side (docs/results/day0.md "Day 0", [4d]): last 50
    # requests tau 2.25 at 1.36x target-only against 2.22 at 1.30x, trainer CPU 216 s against 289 s;
    # on chat -> SQL -> code from the chat head it made 1.2-1.3x the steps and served the same tau,
    # twice (docs/results/shift.md, "A static head from general-assistant traffic").
    loss_vocab: int = 2048
    loss_top_k: int = 16
    window: int = 128  # committed positions per training window (one request's slice)
    recent_ratio: float = 0.5  # share of a batch drawn from the newest windows, rest from replay
    recent_windows: int = 64  # "newest": the last N windows
    reservoir_windows: int = 2048  # replay reservoir over all traffic (reservoir sampling)
    reservoir_bytes: int | None = 512 << 20  # ... and at most about this many bytes of windows
    holdout_every: int = 8  # 1 in N requests is held out for the gate (never trained on)
    # True: exactly one request in each block of holdout_every arrivals is held out; False: a
    # hash of the request id (1 in N on average, so after a shift the first new request held out
    # can take 20+ requests, and which ones depends on the ids' luck). On by default: on the
    # proxy it removed a gate stuck for a whole segment (live mean over three seeds 0.425
    # against 0.391); in the bench it tied with the hash three times with one held-out draw for
    # both arms (1.23x and 1.23x, 1.30x and 1.32x, 1.25x and 1.25x the static head;
    # docs/results/gate.md, "The gate as served"), and on day 0 (tau 2.16 and 2.36 against the
    # hash's 2.22 and 2.29, [4w]), so it is kept for the bounded wait (bench suffix
    # @trainer.holdout_blocks=false).
    holdout_blocks: bool = True
    holdout_windows: int = 32  # the gate's slice: the newest held-out windows
    reuse: float = 16.0  # train on at most reuse x (positions ingested); then wait for traffic
    publish_every: int = 25  # optimizer steps between candidate evaluations
    # > 0: candidates carry an exponential moving average of the trained weights with this
    # decay per step (flywheel/average.py) instead of the weights of the step they were frozen
    # at; 0: the latter. Off by default: on chat -> SQL -> code at 0.9 the proxy caught up 11%
    # further, the bench served the same tokens/s with half as many versions live
    # (docs/results/shift.md, "A static head from general-assistant traffic"; bench suffix
    # @trainer.candidate_ema=0.9).
    candidate_ema: float = 0.0
    gate_depth: int = 4  # draft length of the offline acceptance measure
    # The measure drafts what serving drafts: top-``score_width`` trees (1: greedy chains). Its
    # per-depth rates seed serving's draft-length policy at every swap, and that policy prices
    # trees: chain rates there put depth 1 at the top-1 rate where a top-3 tree hits far more
    # often. 0: the serving drafter's width (OnlineLearner fills it in; chains elsewhere).
    score_width: int = 0
    gate_positions: int = 512  # the newest held-out positions the gate judges on
    # If > 0: on that slice a held-out window k windows older than the newest weighs
    # 0.5 ** (k / gate_half_life), so traffic that just changed counts before it fills the slice.
    # Off by default: 4 raised the proxy's live mean 2% on one seed, two ties in the bench with
    # holdout_blocks (docs/results/gate.md, "The gate as served"; @trainer.gate_half_life=4).
    gate_half_life: float = 0.0
    # If > 0: after a traffic shift (the served acceptance of whatever head is live, over the
    # newest rest_wake_steps drafting steps, falls by rest_wake_drop below its peak) the gate
    # judges on the newest max(this, positions held out since the shift) positions, until
    # gate_positions of them arrived since. Off by default: at 256, on the wide shift measured
    # side by side with it off, it served 1.01x the static head after the shifts where off
    # served 1.04x (a 256-position slice passed candidates on noise), and 1.05x with
    # holdout_every_shift 4 (docs/results/gate.md, "The gate after a shift"; bench suffixes
    # @shiftgate, @hN).
    gate_shift_positions: int = 0
    # ... and until then 1 in this many new requests is held out (0: holdout_every, the same
    # as before the shift); e.g. 4 fills the slice of new traffic twice as fast.
    holdout_every_shift: int = 0
    # Prequential gate: each candidate is frozen and judged on the gate_positions scored
    # positions of all traffic that arrives after that (held out or not; neither it nor the
    # live head trained on them), then published if it passes. After a shift the slice is new
    # traffic within ~8 requests where the held-out one takes ~64; the price: a published head
    # is that much traffic older than the weights in training.
    gate_prequential: bool = False
    gate_margin: float = 0.02  # candidate must beat live acceptance length by this much
    # How a published candidate's gate rates seed serving's draft-length policy (per depth).
    # False: as they are (the default). True: paired, the policy's own estimates for the live
    # head moved by the candidate's gain over the live head on the same slice (candidate minus
    # live, per depth). Why: early slices are small (gate_min_positions 32, one request or
    # two) and the rates' level on them can be far from the traffic's, where the difference
    # of two heads on one slice is paired. Seen: in docs/bench/shift-aa/ a candidate passed on a
    # chat slice of one request (63 positions) at depth-1 rate 0.14 where serving measured the
    # live head at 0.32; drafting went off for 15 requests in both online arms while the
    # static arm, the same head, drafted on (chat 0.93x / 0.91x the static head). Not adopted:
    # on day 0 ([4x]) it tied on tau (2.21 against 2.23) and showed two faults. Serving's
    # estimate for a head that barely drafted is its prior, not a measurement (version 1 was
    # seeded 0.044 where the gate said 0.185); and a small slice's negative gain at a deeper
    # depth held that depth's estimate at 0.01-0.16 for the whole run, an error drafting never
    # corrects, since a depth the policy does not draft is never measured. Since session 63
    # the pairing applies only as far as serving's estimate is a measurement, not its seed
    # (publisher.paired_seed: c + w * (m - live)); on the shift stream a tie (1.15x against the
    # default's 1.16x, docs/bench/shift-measured/), and on day 0 tau 2.21 against 2.27
    # (docs/bench/day0-measured/), where one seed still came from a few probe trials read as a
    # measurement: a weight from trial counts is the next step. Bench suffix
    # @trainer.paired_policy_seed=true (docs/results/gate.md, "Pairing only what serving measured").
    paired_policy_seed: bool = False
    gate_min_positions: int = 32  # no publication before the held-out slice has this many
    vocab_rebuild_coverage: float = 0.97  # rebuild the draft vocab below this coverage
    # Rest: after this many gates in a row where a candidate did not beat the live head (on a
    # held-out slice big enough to judge), training has nothing more to gain from the traffic
    # seen; the trainer stops stepping and its core goes back to serving (0: never rest). It
    # wakes when the live head's acceptance on requests held out since it rested (at least
    # gate_positions of them) falls by the share rest_wake_drop below its level on the whole
    # held-out slice at rest (traffic shifted), when the draft vocabulary covers less than
    # rest_wake_coverage of the tokens emitted since the rest (new tokens), or after enough new
    # training windows (new data): rest_min_windows, doubled for each rest since a candidate
    # last passed, at most rest_max_windows. Why the backoff: on 2 cores training costs serving
    # ~30% of its tokens/s (bench, one thread of two), so a head that stopped improving should
    # be trained rarely.
    # A wake on new windows alone is a probe: one judged gate without a better candidate ends it.
    rest_after_rejections: int = 2
    # A candidate that beats the live head by less than this share of the live head's
    # acceptance is published (serving gets the better head) but counts as a gate without
    # progress for resting and for the backoff. Why: a sharing trainer costs serving ~25% of
    # its tokens/s while it trains (one thread of two), and a head gaining a few per cent per
    # candidate has stopped paying for that (0: any pass counts as progress). Measured on the
    # 300-request day-0 stream (docs/results/day0.md, "Day 0"): 0 / 0.05 / 0.10 served 220 / 203 /
    # 163 requests on one thread, 1.26x / 1.28x / 1.32x target-only overall. 0.2 tied (a lower
    # tau on the AVX512-BF16 host; on an AVX2-only one, two runs, the same speed: "Day 0" and
    # "Resting sooner on an AVX2-only host", same file).
    rest_progress: float = 0.10
    rest_wake_drop: float = 0.25
    # The coverage wake: the draft vocabulary covers less than rest_wake_coverage of the tokens
    # emitted since the rest (the newest vocab_coverage_window of them, once there are at least
    # rest_coverage_tokens). Why only those: the vocabulary is rebuilt from the traffic seen so
    # far, the recent window included, so right after a rebuild the window's coverage is
    # measured on tokens it was chosen from (~1.0), and it drifts to its out-of-sample level as
    # the window rolls on. On the mixed day-0 stream that level is 0.87-0.92: 8-13% of emitted
    # tokens were never seen before (fewer than 8192 distinct tokens occur in 300 requests, so
    # the vocabulary holds every token seen; scripts/coverage_drift.py). So the old
    # rule (the window's coverage below 0.95) woke a resting trainer 30-40 requests into every
    # rest with no change in the traffic, whatever the rest's backoff. A vocabulary built on
    # chat covers 0.75-0.80 of SQL; one built on chat and SQL covers code as well as mixed
    # traffic (~0.89): there only the served-acceptance wake can tell.
    rest_wake_coverage: float = 0.85
    rest_coverage_tokens: int = 1024
    # False: the rule before 97b4105 (the recent window's coverage below rest_wake_coverage, 0.95
    # then), kept to run the two side by side: bench suffix
    # @trainer.rest_coverage_since_rest=false@trainer.rest_wake_coverage=0.95.
    rest_coverage_since_rest: bool = True
    # A coverage wake is a probe too (one gate without progress ends it). Why: new tokens alone
    # do not say the head drafts worse; a real shift also drops the served acceptance, and that
    # wake keeps rest_after_rejections.
    rest_coverage_probe: bool = True
    # > 0: a probe (a wake on new windows or on coverage, see above) judges its first candidate
    # after this many optimizer steps instead of publish_every. Why: a probe that finds nothing
    # costs serving its second thread until that gate (7-11 requests on the day-0 stream), and
    # most probes of a head that stopped improving find nothing; the price is a probe that
    # would have found a better head after publish_every steps and does not after fewer.
    # 0: publish_every (the default; bench suffix @trainer.probe_publish_every=N to compare).
    probe_publish_every: int = 0
    # > 0: a probe whose gate finds progress (a candidate better by rest_progress) publishes it
    # and probes on: one gate without progress ends it, and the rest after it is this many
    # doublings shorter than the last (another gate with progress: shorter again). 0: progress
    # ends the probe, the backoff starts over at rest_min_windows and the trainer trains until
    # rest_after_rejections gates without progress (the rule before 89b0c75; bench suffix
    # @trainer.probe_progress_rewind=0 to compare). Why: a probe late in a rest series that finds
    # one 10% better head otherwise costs serving its second thread for two more gates and for
    # every shorter probe after them. Side by side on the day-0 stream, five runs (docs/RESULTS.md [4r]):
    # 1.25-1.33x target-only over all 300 requests against 1.19-1.28x with 0, with 325-429
    # trainer steps against 425-575; over the last 50 1.40-1.55x against 1.25-1.50x, tau 2.23-2.29
    # against 2.25-2.31 (both day-0 goals met in four of five, the fifth at 1.395x, against four).
    probe_progress_rewind: int = 1
    rest_min_windows: int = 16
    rest_max_windows: int = 256
    # Served acceptance: the live head's own accepted tokens per drafting step on the newest
    # rest_wake_steps verify steps of *all* traffic (the traces say, for free) against its level
    # when it rested; a fall by rest_wake_drop in two such windows in a row wakes it (one is
    # taken for the mix of requests in it: flywheel/rest.py _served_drop). A traffic shift
    # shows here within ~16 requests, where the held-out check (1 request in holdout_every)
    # needs ~60 (0: off).
    rest_wake_steps: int = 256
    # A head that was trained before serving started (version > 0: offline-fitted or resumed)
    # starts resting: it serves the traffic it was fitted on as well as training would make it,
    # and the wakes above say when that stops being true.
    rest_when_trained: bool = True
    vocab_min_tokens: int = 256  # emitted tokens seen before the first (and each) rebuild
    vocab_coverage_window: int = 4096  # recent emitted tokens the coverage is measured on
    autocast: str = "auto"  # bf16 mixed precision: auto (when the device does bf16) | bf16 | off
    # Day-0 lm_head rows (+ norm gain) copied from the target's. Off: measured no faster on
    # SmolLM2 traffic (held-out acceptance 0.18 vs 0.19 after 12 epochs of 5k tokens).
    init_from_target: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.score_width < 0:
            raise ValueError(f"score_width must be >= 0 (0: as serving drafts), "
                             f"got {self.score_width}")
        if not 0.0 <= self.candidate_ema < 1.0:
            raise ValueError(f"candidate_ema must be in [0, 1), got {self.candidate_ema}")
        if self.loss_vocab < 0 or self.loss_top_k < 1:
            raise ValueError(f"loss_vocab must be >= 0 (0: the whole draft vocabulary) and "
                             f"loss_top_k >= 1, got {self.loss_vocab} and {self.loss_top_k}")


@dataclass(frozen=True)
class LearnerConfig:
    mode: str = "online"  # online | static (record and report, never train or swap)
    trace: TraceConfig = field(default_factory=TraceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint_dir: str | None = None  # versioned checkpoints; None: a temp dir, removed at stop
    resume: bool = True  # start from the newest valid checkpoint in checkpoint_dir
    keep_checkpoints: int = 5
    # Torch threads of the trainer process. None (auto): every serving thread for an idle-class
    # trainer, which only runs on CPU time serving leaves (between requests the whole machine
    # is idle, and one thread would use half of it); one for a sharing trainer, which takes its
    # threads from serving while it trains.
    trainer_threads: int | None = None
    # Cores shared between serving and a CPU trainer: serving runs on (its threads at start -
    # trainer_threads) while the trainer trains and on all of them while it rests (False: leave
    # the serving threads alone). Two busy torch processes on more threads than cores slow each
    # other down badly (DESIGN.md section 4).
    share_cores: bool = True
    trainer_device: str = "auto"  # auto: a CUDA device when the machine has one, else cpu
    omp_passive: bool = True  # OMP_WAIT_POLICY=PASSIVE in the trainer process
    # glibc keeps a step's large buffers (the lm_head's dense gradient, ...) in the trainer
    # process's heap instead of faulting in fresh pages every step (aurora_spec/memory.py)
    trainer_heap_buffers: bool = True
    trainer_nice: int = 10  # the trainer process's niceness: serving wins contended cores
    # True: run a CPU trainer under SCHED_IDLE (Linux) instead: it only gets CPU time serving
    # leaves unused, and serving keeps every thread while it trains. Serving loses nothing;
    # learning is as fast as serving is idle (on back-to-back bench traffic it made ~55% of the
    # sharing trainer's steps from a trained head and ~4% from day 0: docs/bench/HISTORY.md).
    # None (auto): idle when serving starts from a trained head (live version > 0 after resume),
    # where it measured faster than sharing; sharing from a day-0 head, which must learn fast.
    trainer_idle: bool | None = None
    # Whether the trainer rests once the head stops improving (TrainerConfig.rest_*). None
    # (auto): a sharing trainer rests, so serving gets its core back; an idle-class CPU trainer
    # does not, since it only ever runs on CPU time serving leaves unused (resting would free
    # nothing, and it stopped learning a shift for most of the idle time it had).
    trainer_rests: bool | None = None
    send_bytes: int = 8 << 20  # traces handed to the trainer per request
    # Drafting verify steps on a new version before judging it, as many as the previous version's
    # level is measured on (VersionStats.recent): steps within a request are correlated, and 48
    # (about one 64-token request) rolled back 5 of 7 versions that the held-out gate had passed
    # (gemma shift at 50% load, docs/bench/HISTORY.md).
    rollback_min_steps: int = 256
    rollback_drop: float = 0.25  # roll back when accepted/step falls by more than this share
    rollback_min_gap: float = 0.1  # ... and by at least this many tokens per step
    # Such a drop compares different requests: with rollback_paired the trainer scores the new
    # and the previous head on the same traffic that arrived since the new one was frozen, and
    # only a loss there rolls back (flywheel/judge.py); without a verdict within
    # rollback_verdict_steps more drafting steps (trainer busy or dead) the drop alone does.
    rollback_paired: bool = True
    rollback_verdict_steps: int = 256
    watchdog_s: float = 0.5  # how often the trainer process is checked
    restart_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("online", "static"):
            raise ValueError(f"mode must be online or static, got {self.mode!r}")
        if self.trainer_threads is not None and self.trainer_threads < 1:
            raise ValueError("trainer_threads must be >= 1 (or None: auto)")
