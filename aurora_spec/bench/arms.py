"""Benchmark arms: what runs one request (``Arm``), the engine-backed and transformers arms, and
the registry that turns ``--arms kind[:ARG][@wN]`` into arms (DESIGN.md section 6).

* ``register_arm(kind, builder)`` adds an arm kind; ``--arms kind:ARG`` passes ``ARG`` to it and
  ``@wN`` sets that arm's tree width. An arm is anything with ``name``, ``kind``,
  ``run(prompt_ids, max_tokens, domain, request_id) -> ArmOutput`` and ``close()``.
  Engine-backed arms expose ``.engine`` (for batched runs).
* Every output is normalised (stop tokens dropped) so arms compare token by token.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class BenchError(ValueError):
    """Bad benchmark configuration: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Arms


@dataclass(frozen=True)
class ArmOutput:
    """One request on one arm. ``token_ids`` never include stop tokens (normalised)."""

    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    decode_tokens: int  # tokens produced by decode/verify forwards (the prefill token excluded)
    decode_s: float
    prefill_s: float
    tau: float | None = None  # None: the arm does not speculate (hf)
    draft_version: int | None = None
    proposed: int | None = None
    accepted: int | None = None
    # A drafter with several sources (eagle3 + lookup): tau had only that source drafted, judged
    # on the same verify steps (drafters/hybrid.py); None otherwise.
    tau_head: float | None = None
    tau_lookup: float | None = None
    threads: int | None = None  # serving threads, when the arm changes them (online arms)
    # Verify steps per serving thread count (GenerationStats.steps_by_threads): an online arm's
    # trainer may start or stop training, and serving change its thread count, mid-request.
    threads_steps: dict[int, int] | None = None
    # The draft-length policy at the request's start and end (PolicySnapshot.as_dict).
    policy: dict[str, Any] | None = None
    # An online arm's trainer as serving last heard of it when the request's idle time ended
    # (bench/online.py trainer_counters): steps, gates judged and refused, the last gate.
    trainer: dict[str, Any] | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode tokens/s, prefill excluded (same definition as GenerationResult)."""
        if self.decode_tokens <= 0 or self.decode_s <= 0:
            return None
        return self.decode_tokens / self.decode_s


class Arm(Protocol):
    name: str
    kind: str

    def run(self, prompt_ids: list[int], max_tokens: int, domain: str | None,
            request_id: str) -> ArmOutput: ...

    def close(self) -> None: ...


class EngineArm:
    """Our engine with one drafter (or none: target-only)."""

    def __init__(self, name: str, kind: str, engine: Any, stop_ids: tuple[int, ...]) -> None:
        self.name, self.kind, self.engine, self.stop_ids = name, kind, engine, stop_ids

    def run(self, prompt_ids: list[int], max_tokens: int, domain: str | None,
            request_id: str) -> ArmOutput:
        from aurora_spec.types import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, stop_token_ids=self.stop_ids)
        res = self.engine.generate(list(prompt_ids), params, request_id=request_id,
                                   domain=domain)
        s = res.stats
        drafter = self.engine.drafter
        speculates = drafter is not None
        tau_head = tau_lookup = None
        counts = drafter.request_counts(request_id) if hasattr(drafter, "request_counts") else None
        if counts is not None and s.verify_steps:
            tau_head = s.tau_head  # the engine's own count of the head's share
            tau_lookup = 1 + counts[2] / s.verify_steps
        return ArmOutput(tuple(res.token_ids), res.finish_reason, res.prompt_tokens,
                         s.emitted, s.decode_s, s.prefill_s, s.tau,
                         max(s.draft_versions, default=0),
                         s.proposed if speculates else None, s.accepted if speculates else None,
                         tau_head, tau_lookup, threads_steps=dict(s.steps_by_threads),
                         policy=({"start": s.policy_start, "end": s.policy_end}
                                 if s.policy_start is not None else None))

    @property
    def target_kernels(self) -> str:
        """``packed`` when the target's linears read the packed CPU copies, else ``plain``
        (F.linear, or whatever the device's own kernels are)."""
        runner = self.engine.runner
        return ("packed" if runner.packed_kernels and runner.model.cpu_lm_head is not None
                else "plain")

    @property
    def draft_kernels(self) -> str | None:
        """The learned draft head's kernels and dtype (Eagle3Drafter.kernels); None without one."""
        drafter = self.engine.drafter
        return getattr(getattr(drafter, "learned", drafter), "kernels", None)

    @property
    def lookup_tree(self) -> str | None:
        """Beside a lookup chain that adds nodes: ``first branch`` of the head's tree (narrow) or
        ``all branches``, as resolved at load (``lookup_narrow`` auto measures); None without a
        lookup chain."""
        narrow = getattr(self.engine.drafter, "narrow", None)
        return None if narrow is None else "first branch" if narrow else "all branches"

    def status(self) -> dict[str, Any]:
        """The drafter's own counters, when it keeps any (ngram, eagle3 + lookup)."""
        stats = getattr(self.engine.drafter, "stats", None)
        return {"drafter": stats()} if callable(stats) else {}

    def close(self) -> None:
        pass


class _Clock:
    """A generate() streamer that only timestamps: put() #0 is the prompt, #1 the first new
    token (end of prefill), then one per decode forward."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HfArm:
    """transformers' own ``generate()``: greedy, batch 1, KV cache, same stop tokens."""

    def __init__(self, name: str, model: Any, stop_ids: tuple[int, ...],
                 pad_id: int | None = None) -> None:
        self.name, self.kind, self.model, self.stop_ids = name, "hf", model, stop_ids
        self.pad_id = pad_id if pad_id is not None else (stop_ids[0] if stop_ids else 0)
        self.device = next(model.parameters()).device

    def run(self, prompt_ids: list[int], max_tokens: int, domain: str | None,
            request_id: str) -> ArmOutput:
        from transformers import GenerationConfig
        from transformers.generation.streamers import BaseStreamer

        class Clock(_Clock, BaseStreamer):
            pass

        gen_cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                                   eos_token_id=list(self.stop_ids) or None,
                                   pad_token_id=self.pad_id, use_cache=True)
        ids = torch.tensor([list(prompt_ids)], device=self.device)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      generation_config=gen_cfg, streamer=clock)
        t_end = time.perf_counter()
        new = [int(t) for t in out[0, len(prompt_ids):].tolist()]
        tokens, finish = normalise_output(new, self.stop_ids, max_tokens)
        first = clock.times[1] if len(clock.times) > 1 else t_end
        return ArmOutput(tokens, finish, len(prompt_ids), max(len(new) - 1, 0), t_end - first,
                         first - t0)

    def close(self) -> None:
        pass


def normalise_output(ids: Sequence[int], stop_ids: Sequence[int],
                     max_tokens: int) -> tuple[tuple[int, ...], str]:
    """Cut at the first stop token (dropped, as our engine drops it) and report why it ended.
    transformers' generate() keeps the EOS token in its output; our engine does not."""
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return tuple(ids[:i]), "stop"
    return tuple(ids), "length" if len(ids) >= max_tokens else "stop"


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are equal. A sequence that
    is a strict prefix of the other diverges where it ends."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------
# Building arms


@dataclass(frozen=True)
class ArmOptions:
    max_draft: int = 8
    draft_weights: str | None = None
    draft_vocab: int = 8192
    tree_width: int | None = None  # None: the drafter's default
    seed: int = 0
    calibrate: bool = True
    max_slots: int = 1  # KV cache slots per engine arm (> 1 for concurrency sweeps)
    draft_dtype: str = "auto"
    lookup: bool = True  # eagle3 arms: verify an n-gram lookup chain with the head's tree
    lookup_narrow: bool | None = None  # ... and only the head's first branch where the chain
    # adds nodes (None: auto, by the target's measured cost per row; DrafterConfig)
    trainer_idle: bool | None = None  # online arms: idle-class trainer (LearnerConfig; None: auto)
    trainer_threads: int | None = None  # online arms: trainer process threads (None: auto)
    trainer_rests: bool | None = None  # online arms: the trainer rests when it stops improving
    rollback_paired: bool = True  # online arms: a suspect swap is judged on the same traffic
    trainer_spin: bool = False  # online arms: the trainer's OpenMP threads spin (omp_passive off)
    # Online arms: glibc keeps the trainer's large buffers in its heap (LearnerConfig)
    trainer_heap_buffers: bool = True
    # Online arms: (field, value) overrides of their TrainerConfig and TraceConfig, from the
    # arm's ``@trainer.FIELD=VALUE`` / ``@trace.FIELD=VALUE`` suffixes (and the short aliases).
    trainer_config: tuple[tuple[str, Any], ...] = ()
    trace_config: tuple[tuple[str, Any], ...] = ()
    # Any engine arm: (field, value) overrides of its draft-length PolicyConfig
    # (``@policy.FIELD=VALUE``).
    policy_config: tuple[tuple[str, Any], ...] = ()
    # Online arms: the server's utilisation. Below 1, each request is followed by the idle time a
    # server at that load would have, (1/load - 1) x the request's time, the trainer running.
    load: float = 1.0
    # Target-only arms: auto takes F.linear where it measures faster (runtime.target_kernels);
    # packed (suffix ``@packed``) keeps the kernels the speculating arms verify on.
    target_kernels: str = "auto"


@dataclass
class BenchTarget:
    """The shared target: loaded once, used by every arm."""

    info: Any
    tokenizer: Any
    model: Any  # DecoderModel
    max_context: int
    stop_ids: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    _hf: Any = None

    def hf_model(self) -> Any:
        if self._hf is None:
            from aurora_spec.models.loader import load_hf_model

            device = str(self.model.embed.weight.device)
            self._hf = load_hf_model(self.info.dir, self.dtype, device)
        return self._hf


ArmBuilder = Callable[[BenchTarget, str, str | None, ArmOptions], Arm]
ARM_BUILDERS: dict[str, ArmBuilder] = {}


def register_arm(kind: str, builder: ArmBuilder) -> None:
    """Add an arm kind: ``builder(target, name, arg, options) -> Arm``."""
    ARM_BUILDERS[kind] = builder


def arm_builders() -> dict[str, ArmBuilder]:
    """Every arm kind, the online ones included: their module imports this one, so it registers
    them when first imported, here at the latest (parse_arms("online") must not depend on
    whether some caller happened to import bench.online first)."""
    import aurora_spec.bench.online  # noqa: F401

    return ARM_BUILDERS


def engine_arm(target: BenchTarget, name: str, kind: str, drafter_name: str,
               weights: str | None, opts: ArmOptions) -> EngineArm:
    from aurora_spec.config import DrafterConfig
    from aurora_spec.drafters.policy import PolicyConfig
    from aurora_spec.engine.engine import Engine, EngineConfig
    from aurora_spec.models.runner import CacheConfig, TargetRunner
    from aurora_spec.runtime import make_drafter, target_kernels

    drafter = make_drafter(DrafterConfig(drafter_name, weights, opts.draft_vocab, opts.tree_width,
                                         opts.seed, opts.draft_dtype, opts.lookup,
                                         opts.lookup_narrow), target.model)
    packed = target_kernels(target.model, drafter is not None, opts.max_slots,
                            opts.target_kernels)
    runner = TargetRunner(target.model, CacheConfig(opts.max_slots, target.max_context), packed)
    policy = PolicyConfig(**{"max_draft": opts.max_draft, **dict(opts.policy_config)})
    engine = Engine(runner, drafter, EngineConfig(policy, calibrate=opts.calibrate))
    return EngineArm(name, kind, engine, target.stop_ids)


def _build_none(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    return engine_arm(t, name, "none", "none", None, o)


def _build_ngram(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    return engine_arm(t, name, "ngram", "ngram", None, o)


def _build_eagle3(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    return engine_arm(t, name, "eagle3", "eagle3", arg or o.draft_weights, o)


def _build_static(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    if not arg:
        raise BenchError("arm 'static' needs a head directory: static:DIR")
    return engine_arm(t, name, "static", "eagle3", arg, o)


def _build_hf(t: BenchTarget, name: str, arg: str | None, o: ArmOptions) -> Arm:
    pad = getattr(t.tokenizer, "pad_token_id", None)
    return HfArm(name, t.hf_model(), t.stop_ids, pad)


for _kind, _builder in (("none", _build_none), ("ngram", _build_ngram), ("eagle3", _build_eagle3),
                        ("static", _build_static), ("hf", _build_hf)):
    register_arm(_kind, _builder)


@dataclass(frozen=True)
class ArmSpec:
    name: str  # as written on the command line, the key in results.json
    kind: str
    arg: str | None
    # Per-arm overrides of ArmOptions by suffix (None: the run's option).
    tree_width: int | None = None  # ``@wN``: this arm drafts top-N trees
    lookup: bool | None = None  # ``@lookup`` / ``@nolookup``: this arm's eagle3 lookup chain
    lookup_narrow: bool | None = None  # ``@narrow`` / ``@wide``: the head's siblings beside it
    trainer_idle: bool | None = None  # ``@idle`` / ``@share`` (online arms); None: auto
    trainer_threads: int | None = None  # ``@tN`` (online arms): the trainer's threads
    trainer_rests: bool | None = None  # ``@rest`` / ``@norest`` (online arms); None: auto
    rollback_paired: bool | None = None  # ``@paired`` / ``@unpaired`` (online arms)
    trainer_spin: bool | None = None  # ``@spin`` / ``@nospin`` (online arms)
    trainer_heap_buffers: bool | None = None  # ``@heap`` / ``@mmap`` (online arms)
    trainer_config: tuple[tuple[str, Any], ...] | None = None  # ``@trainer.FIELD=VALUE`` ...
    trace_config: tuple[tuple[str, Any], ...] | None = None  # ``@trace.FIELD=VALUE`` (online)
    policy_config: tuple[tuple[str, Any], ...] | None = None  # ``@policy.FIELD=VALUE`` (engines)
    target_kernels: str | None = None  # ``@packed``: target-only on the speculating kernels


_OVERRIDES = ("tree_width", "lookup", "lookup_narrow", "trainer_idle", "trainer_threads",
              "trainer_rests", "rollback_paired", "trainer_spin", "trainer_heap_buffers",
              "trainer_config", "trace_config", "policy_config", "target_kernels")
_TRAINER = {"trainer_idle", "trainer_threads", "trainer_rests", "rollback_paired", "trainer_spin",
            "trainer_heap_buffers", "trainer_config", "trace_config"}
_SUFFIX = re.compile(r"@(w\d+|t\d+|h\d+|r\d+|lookup|nolookup|narrow|wide|idle|share|rest|norest|paired|unpaired|spin|nospin|heap|mmap|packed"
                     r"|shiftgate|noshiftgate|(?:trainer|trace|policy)\.\w+=[^@]+)$")
_FLAGS = {"idle": ("trainer_idle", True), "share": ("trainer_idle", False),
          "rest": ("trainer_rests", True), "norest": ("trainer_rests", False),
          "paired": ("rollback_paired", True), "unpaired": ("rollback_paired", False),
          "spin": ("trainer_spin", True), "nospin": ("trainer_spin", False),
          "heap": ("trainer_heap_buffers", True), "mmap": ("trainer_heap_buffers", False),
          "lookup": ("lookup", True), "nolookup": ("lookup", False),
          "narrow": ("lookup_narrow", True), "wide": ("lookup_narrow", False),
          "packed": ("target_kernels", "packed")}
# Short names for config overrides measured in docs/RESULTS.md: ``@shiftgate`` is the gate that
# follows shifts at the value measured (256 positions), ``@hN`` holds out 1 in N requests
# after a shift, ``@rN`` draws N% of each batch from the newest windows.
_ALIASES = {"shiftgate": "trainer.gate_shift_positions=256",
            "noshiftgate": "trainer.gate_shift_positions=0"}


def _expand(part: str, tag: str) -> str:
    """A suffix's canonical form: aliases spelled out as ``trainer.FIELD=VALUE``."""
    if tag in _ALIASES:
        return _ALIASES[tag]
    if tag[0] in "wth" and tag[1:].isdigit() and int(tag[1:]) < 1:
        raise BenchError(f"arm {part!r}: the number after @{tag[0]} must be >= 1")
    if tag[0] == "h" and tag[1:].isdigit():
        return f"trainer.holdout_every_shift={tag[1:]}"
    if tag[0] == "r" and tag[1:].isdigit():
        if int(tag[1:]) > 100:
            raise BenchError(f"arm {part!r}: @rN takes a percentage, 0 to 100")
        return f"trainer.recent_ratio={int(tag[1:]) / 100}"
    return tag


def _config_value(part: str, config: type, field: str, text: str) -> Any:
    """``text`` as the type of ``config``'s ``field`` (its default's type)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    if field not in fields:
        raise BenchError(f"arm {part!r}: {config.__name__} has no field {field!r} "
                         f"(fields: {', '.join(fields)})")
    default = fields[field].default  # MISSING (a factory's field): not settable below
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(default, (int, float, str)):
            return type(default)(text)
    except ValueError:
        raise BenchError(f"arm {part!r}: {config.__name__}.{field} must be of type "
                         f"{type(default).__name__} (got {text!r})") from None
    raise BenchError(f"arm {part!r}: {config.__name__}.{field} cannot be set from an arm suffix")


def _config_override(part: str, tag: str) -> tuple[str, str, Any]:
    """``trainer.FIELD=VALUE`` / ``trace.FIELD=VALUE`` / ``policy.FIELD=VALUE``: (which, field,
    typed value)."""
    from aurora_spec.drafters.policy import PolicyConfig
    from aurora_spec.flywheel.config import TraceConfig, TrainerConfig

    lhs, _, text = tag.partition("=")
    which, _, field = lhs.partition(".")
    config = {"trainer": TrainerConfig, "trace": TraceConfig, "policy": PolicyConfig}[which]
    return which, field, _config_value(part, config, field, text)


def _suffixes(part: str) -> tuple[str, dict[str, Any]]:
    """Strip the ``@...`` suffixes (any order; see parse_arms) off one arm: the body and the
    ArmSpec overrides they set."""
    over: dict[str, Any] = {}
    configs: dict[str, dict[str, Any]] = {"trainer": {}, "trace": {}, "policy": {}}
    body = part
    while (m := _SUFFIX.search(body)) is not None:
        tag = _expand(part, m.group(1))
        if tag in _FLAGS:
            key, value = _FLAGS[tag]
            over[key] = value
        elif tag.startswith(("trainer.", "trace.", "policy.")):
            which, field, value = _config_override(part, tag)
            configs[which].setdefault(field, value)  # the rightmost suffix wins
        else:  # @wN / @tN: the regex guarantees digits
            over[{"w": "tree_width", "t": "trainer_threads"}[tag[0]]] = int(tag[1:])
        body = body[:m.start()]
    for which, values in configs.items():
        if values:
            over[f"{which}_config"] = tuple(sorted(values.items()))
    return body, over


def parse_arms(spec: str) -> list[ArmSpec]:
    """``kind[:ARG][@wN][@lookup|@nolookup][@narrow|@wide][@idle|@share][@tN][@rest|@norest]
    [@paired|@unpaired][@spin|@nospin][@heap|@mmap][@trainer.FIELD=VALUE][@trace.FIELD=VALUE]
    [@policy.FIELD=VALUE][@shiftgate|@noshiftgate][@hN][@rN][@packed]``
    separated by commas, e.g.
    ``none,online,online@w3,online@nolookup,online@idle@t1,online@trainer.lr=0.003,static:DIR``.
    ``@trainer.FIELD=VALUE`` / ``@trace.FIELD=VALUE`` set one field of an online arm's
    TrainerConfig / TraceConfig (flywheel/config.py), ``@policy.FIELD=VALUE`` one of any engine
    arm's draft-length PolicyConfig (drafters/policy.py); ``@shiftgate`` is
    ``@trainer.gate_shift_positions=256``, ``@hN`` ``@trainer.holdout_every_shift=N`` and
    ``@rN`` ``@trainer.recent_ratio=N/100``. ``none@packed``: target-only on the packed kernels
    the speculating arms verify on, where plain ``none`` takes the faster one for one row
    (runtime.target_kernels)."""
    out: list[ArmSpec] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        body, over = _suffixes(part)
        kind, sep, arg = body.partition(":")
        if kind not in arm_builders():
            raise BenchError(f"unknown arm {kind!r} (choose from {', '.join(arm_builders())}; "
                             f"some take an argument: kind:ARG)")
        if _TRAINER & set(over) and not kind.startswith("online"):
            raise BenchError(f"arm {part!r}: @idle, @share, @tN, @rest, @norest, @paired, "
                             f"@unpaired, @spin, @nospin, @heap, @mmap, @trainer.*, @trace.*, @shiftgate, @noshiftgate, @hN "
                             f"and @rN are for online arms (they set their trainer's CPU "
                             f"priority, threads, rests, rollback test and configuration)")
        if "target_kernels" in over and kind != "none":
            raise BenchError(f"arm {part!r}: @packed is for target-only arms (none); arms that "
                             f"verify drafts always run the target on the packed kernels")
        out.append(ArmSpec(part, kind, arg if sep else None, **over))
    if not out:
        raise BenchError("--arms is empty")
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise BenchError(f"--arms lists an arm twice: {spec}")
    return out


def build_arm(target: BenchTarget, spec: ArmSpec, opts: ArmOptions) -> Arm:
    over = {k: v for k in _OVERRIDES if (v := getattr(spec, k)) is not None}
    opts = dataclasses.replace(opts, **over)
    return arm_builders()[spec.kind](target, spec.name, spec.arg, opts)
