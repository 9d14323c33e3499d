"""Benchmark traffic: prompts per domain from ``../shared/data/traffic`` (DESIGN.md section 5).

Each domain is one JSONL file ``<domain>.jsonl`` whose lines are ``{"id", "domain", "source",
"prompt"}``. Selection is deterministic: every domain's prompts are shuffled with a seed derived
from ``(seed, domain)`` and consumed in that order by a :class:`DomainPool`, so

* the same ``--seed`` always selects the same prompts, whatever other domains are in the run;
* a domain appearing in several stream segments (``chat:50,code:50,chat:50``) never repeats a
  prompt: later segments continue where earlier ones stopped (held-out prompts for forgetting);
* warm-up prompts are drawn *after* the measured ones, so ``--warmup`` never changes them.

Two ways to plan a run:

* **mixed** (``--domains a,b --requests N``): N prompts per domain, interleaved round-robin
  (a, b, a, b, ...);
* **stream** (``--stream chat:100,code:100``): ordered segments, each ``count`` prompts of one
  domain, in order (abrupt domain shifts).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TRAFFIC_ENV = "AURORA_TRAFFIC"


class TrafficError(ValueError):
    """Missing or malformed traffic data, or an impossible selection. One line for the user."""


@dataclass(frozen=True)
class Prompt:
    id: str
    domain: str
    source: str
    prompt: str


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive requests of one domain in a stream."""

    domain: str
    count: int


@dataclass(frozen=True)
class PlannedRequest:
    prompt: Prompt
    segment: int  # index of the stream segment (mixed runs: always 0)


@dataclass(frozen=True)
class Plan:
    warmup: list[PlannedRequest]
    requests: list[PlannedRequest]
    segments: list[Segment]  # stream segments, or one Segment per domain for mixed runs
    mode: str  # "mixed" | "stream"


def default_traffic_dir() -> Path:
    """``$AURORA_TRAFFIC``, else ``../shared/data/traffic`` relative to the repository root
    (located from this package, so it works from any working directory)."""
    env = os.environ.get(TRAFFIC_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    return (repo.parent / "shared" / "data" / "traffic").resolve()


def resolve_traffic_dir(path: str | os.PathLike[str] | None) -> Path:
    d = Path(path).expanduser() if path else default_traffic_dir()
    if not d.is_dir():
        raise TrafficError(f"traffic directory not found: {d} (pass --traffic DIR or set "
                           f"${TRAFFIC_ENV}; it holds one <domain>.jsonl per domain)")
    if not list_domains(d):
        raise TrafficError(f"no <domain>.jsonl files in traffic directory {d}")
    return d


def list_domains(traffic_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(traffic_dir).glob("*.jsonl") if p.is_file())


def load_domain(traffic_dir: Path, domain: str) -> list[Prompt]:
    """All prompts of one domain, in file order. Raises TrafficError on a missing file or a
    malformed line (with its line number)."""
    path = Path(traffic_dir) / f"{domain}.jsonl"
    if not path.is_file():
        known = ", ".join(list_domains(traffic_dir)) or "none"
        raise TrafficError(f"unknown domain {domain!r}: no {path} (domains: {known})")
    out: list[Prompt] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row["prompt"]
                if not isinstance(prompt, str) or not prompt:
                    raise ValueError("empty prompt")
                out.append(Prompt(str(row.get("id", f"{domain}:{lineno}")),
                                  str(row.get("domain", domain)), str(row.get("source", "")),
                                  prompt))
            except (ValueError, KeyError, TypeError) as e:
                raise TrafficError(f"{path}:{lineno}: malformed traffic line ({e})") from e
    if not out:
        raise TrafficError(f"{path} holds no prompts")
    return out


class DomainPool:
    """Deterministically shuffled prompts of one domain, handed out once each."""

    def __init__(self, domain: str, prompts: list[Prompt], seed: int) -> None:
        self.domain = domain
        self._order = list(prompts)
        random.Random(f"{seed}/{domain}").shuffle(self._order)
        self._next = 0
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._order)

    def take(self, accept: Callable[[Prompt], bool] | None = None) -> Prompt:
        while self._next < len(self._order):
            p = self._order[self._next]
            self._next += 1
            if accept is None or accept(p):
                return p
            self.skipped += 1
        raise TrafficError(f"domain {self.domain!r} ran out of prompts ({len(self._order)} in "
                           f"the file, {self.skipped} skipped as too long)")


def parse_domains(spec: str) -> list[str]:
    domains = [d.strip() for d in spec.split(",") if d.strip()]
    if not domains:
        raise TrafficError("--domains is empty")
    if len(set(domains)) != len(domains):
        raise TrafficError(f"--domains lists a domain twice: {spec}")
    return domains


def parse_stream(spec: str) -> list[Segment]:
    """``"chat:100,code:100"`` -> [Segment("chat", 100), Segment("code", 100)]."""
    segments: list[Segment] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        domain, sep, count = part.rpartition(":")
        if not sep or not domain:
            raise TrafficError(f"bad stream segment {part!r}: expected DOMAIN:COUNT")
        try:
            n = int(count)
        except ValueError:
            raise TrafficError(f"bad stream segment {part!r}: COUNT must be an integer") from None
        if n <= 0:
            raise TrafficError(f"bad stream segment {part!r}: COUNT must be positive")
        segments.append(Segment(domain, n))
    if not segments:
        raise TrafficError("--stream is empty")
    return segments


def make_pools(traffic_dir: Path, domains: Iterable[str], seed: int) -> dict[str, DomainPool]:
    return {d: DomainPool(d, load_domain(traffic_dir, d), seed) for d in dict.fromkeys(domains)}


def plan_mixed(pools: dict[str, DomainPool], domains: list[str], requests: int, warmup: int,
               accept: Callable[[Prompt], bool] | None = None) -> Plan:
    """``requests`` prompts per domain, interleaved round-robin, then ``warmup`` extra prompts
    (cycling over the domains) run first and excluded from the figures."""
    if requests <= 0:
        raise TrafficError("--requests must be positive")
    reqs = [PlannedRequest(pools[d].take(accept), 0) for _ in range(requests) for d in domains]
    warm = [PlannedRequest(pools[domains[i % len(domains)]].take(accept), 0)
            for i in range(max(warmup, 0))]
    return Plan(warm, reqs, [Segment(d, requests) for d in domains], "mixed")


def plan_stream(pools: dict[str, DomainPool], segments: list[Segment], warmup: int,
                accept: Callable[[Prompt], bool] | None = None) -> Plan:
    """Ordered segments; warm-up prompts come from the first segment's domain (so a stream
    starts in its first domain, as real traffic would)."""
    reqs = [PlannedRequest(pools[s.domain].take(accept), i)
            for i, s in enumerate(segments) for _ in range(s.count)]
    warm = [PlannedRequest(pools[segments[0].domain].take(accept), 0)
            for _ in range(max(warmup, 0))]
    return Plan(warm, reqs, list(segments), "stream")
