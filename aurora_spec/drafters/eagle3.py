"""Eagle3Drafter: proposes with the EAGLE-3 draft head (eagle3_head.py) from the target's fused
hidden states.

Per request we keep every committed pair (h_j, x_{j+1}) at position j: h_j the fused target
hidden state (3H) computed from token x_j. Pairs the head has not run yet are *pending*; they
are caught up in one batched forward at the next proposal with k > 0, so a policy that sets
k = 0 (a blank day-0 head) costs nothing but a buffer copy in observe. Keeping the raw pairs
(not the head's K/V) also makes ``swap_head`` exact: the new head rebuilds each request's draft
cache lazily from true target states. The committed draft cache only ever holds entries built
from target states; the speculative entries of a proposal are dropped right after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from aurora_spec.drafters.eagle3_head import DraftCache, Eagle3Head
from aurora_spec.types import Proposal, SamplingParams, StepTrace

CATCH_UP_CHUNK = 512  # queries per catch-up forward: bounds the (T x S) attention scores
# At most this many pending pairs are run through the head before a proposal; older ones are
# skipped (the head's context then starts there). Why: a day-0 probe on a request with a long
# prompt would otherwise run the whole prompt through the head (~70 ms for 600 tokens here), and
# probes must stay cheap. A head that drafts every step never has more than a few pending.
MAX_CATCH_UP = 128


class _Request:
    """Committed pairs of one request: ``hid[j]``, ``toks[j]`` for j < n; the head's cache holds
    pairs ``start .. start + cache.length - 1`` (slot i is pair start + i), the rest are
    pending."""

    __slots__ = ("cache", "gen", "hid", "last", "n", "start", "toks")

    def __init__(self, width: int, cache: DraftCache, dtype: torch.dtype) -> None:
        device = cache.k.device
        self.hid = torch.empty(0, width, device=device, dtype=dtype)
        self.toks = torch.empty(0, device=device, dtype=torch.long)
        self.n = 0
        self.start = 0
        self.last = -1  # the last committed token (the next proposal's root), a Python int
        self.cache = cache
        self.gen: torch.Generator | None = None  # created on the first seeded sampling proposal

    def append(self, hidden: torch.Tensor, tokens: list[int] | tuple[int, ...], chunk: int) -> None:
        start, end = self.n, self.n + len(tokens)
        if end > len(self.hid):  # grow by half or one chunk: amortised, not per step
            cap = -(-max(end, len(self.hid) * 3 // 2) // chunk) * chunk
            hid = self.hid.new_empty(cap, self.hid.shape[1])
            toks = self.toks.new_empty(cap)
            hid[:start], toks[:start] = self.hid[:start], self.toks[:start]
            self.hid, self.toks = hid, toks
        self.hid[start:end] = hidden
        self.toks[start:end] = torch.tensor(tokens, dtype=torch.long)
        self.n, self.last = end, int(tokens[-1])

    def truncate(self, n: int) -> None:
        self.n = n
        self.start = min(self.start, n)
        self.cache.length = min(self.cache.length, n - self.start)

    @property
    def cached(self) -> int:
        """Pairs 0 .. cached - 1 are in the cache or were skipped; the rest are pending."""
        return self.start + self.cache.length


class Eagle3Drafter:
    """Drafter over an Eagle3Head; ``embed`` (V, H) is the target's frozen token embedding.

    ``tree_width`` w > 1 proposes a tree: the top-w draft tokens at depth 1 (point masses), each
    extended greedily to depth k, so w * k nodes; draft_probs is then None at any temperature.
    """

    name = "eagle3"

    def __init__(self, head: Eagle3Head, embed: torch.Tensor, embed_scale: float = 1.0,
                 tree_width: int = 1, chunk: int = 256,
                 prior_acceptance: float | tuple[float, ...] | None = None,
                 cpu_kernels: bool = True, bf16_weights: bool = False) -> None:
        if tree_width < 1:
            raise ValueError("tree_width must be >= 1")
        # What the engine's draft-length policy assumes before it has measured anything: a
        # random day-0 head is almost never right, so it should not start by drafting long; a
        # trained head brings its held-out per-depth acceptance (Eagle3Head.heldout_alpha).
        self.prior_acceptance = prior_acceptance
        self.cpu_kernels = cpu_kernels  # packed weight copies on CPU (Eagle3Head.use_cpu_kernels)
        self.bf16_weights = bf16_weights  # ... in bfloat16 (runtime.draft_kernels)
        self.pack(head)
        self.head = head
        self.embed = embed
        self.embed_scale = float(embed_scale)
        self.tree_width = tree_width
        self.chunk = chunk
        self._requests: dict[str, _Request] = {}
        self._positions = torch.arange(0)
        # Pairs the last proposal ran through the head before drafting (its catch-up). The
        # engine's cost model skips proposals with a long backlog (a request's first proposal, a
        # probe after k = 0 steps, the first after a swap): a one-off cost, not the per-token one.
        self.last_catch_up = 0

    @property
    def head_width(self) -> int:
        """Branches the head drafts at depth 1 (its held-out rates are per width)."""
        return self.tree_width

    @property
    def kernels(self) -> str:
        """How the head's linears run now, with its dtype (runtime.draft_kernels chose it at
        load): ``F.linear``, ``packed`` or ``packed bf16`` (bfloat16 row-kernel copies), e.g.
        ``packed bf16, float32 head``, read off the copies themselves (Eagle3Head.cpu_kernels).
        The bench records it."""
        dtype = str(self.head.fc.weight.dtype).removeprefix("torch.")
        return f"{self.head.cpu_kernels()}, {dtype} head"

    # ---- lifecycle ----

    def start(self, request_id: str, prompt_ids: list[int], first_token: int,
              prompt_hidden: torch.Tensor) -> None:
        if len(prompt_ids) != len(prompt_hidden) or not prompt_ids:
            raise ValueError(f"prompt_hidden has {len(prompt_hidden)} rows for "
                             f"{len(prompt_ids)} prompt tokens")
        req = _Request(prompt_hidden.shape[-1], self.head.new_cache(1, self.chunk),
                       self.head.fc.weight.dtype)
        with torch.no_grad():
            req.append(prompt_hidden, list(prompt_ids[1:]) + [int(first_token)], self.chunk)
        self._requests[request_id] = req

    def observe(self, trace: StepTrace) -> None:
        req = self._requests.get(trace.request_id)
        if req is None:
            return
        if trace.context_len > req.n:
            raise ValueError(f"request {trace.request_id}: trace at position {trace.context_len} "
                             f"but only {req.n} positions observed (a verify step was skipped)")
        req.truncate(trace.context_len)  # no-op unless a step is replayed
        res = trace.result
        m = len(res.accepted_nodes)
        if res.accepted_nodes == tuple(range(m)):  # chain prefix: a slice, no gather
            rows = trace.fused_hidden[:m + 1]
        else:
            rows = trace.fused_hidden[[0] + [i + 1 for i in res.accepted_nodes]]
        with torch.no_grad():
            req.append(rows, res.emitted, self.chunk)

    def finish(self, request_id: str, tokens: list[int]) -> None:
        self._requests.pop(request_id, None)

    def pack(self, head: Eagle3Head) -> None:
        """Give ``head`` the CPU kernels this drafter serves with (a no-op where it has them)."""
        if self.cpu_kernels:
            head.use_cpu_kernels(self.bf16_weights)

    def swap_head(self, head: Eagle3Head) -> None:
        """Use new weights from the next proposal on. Every request's draft cache was built by the
        old head, so it is emptied: the next catch-up re-runs all stored pairs in one forward.
        Heads arriving through the publisher are packed already (off the engine thread)."""
        self.pack(head)
        self.head = head
        c, w = head.config, head.fc.weight
        for req in self._requests.values():
            req.hid, req.toks = req.hid.to(w.device), req.toks.to(w.device)  # no-op if same
            k = req.cache.k
            if (k.shape[1], k.shape[3], k.dtype, k.device) == (c.num_kv_heads, c.head_dim, w.dtype,
                                                                w.device):
                req.cache.length = 0  # same layout: keep the allocation
            else:
                req.cache = head.new_cache(1, self.chunk)

    # ---- cost calibration ----

    def time_draft(self, prompt_hidden: torch.Tensor, k: int, reps: int = 3,
                   between: Callable[[], None] | None = None) -> float:
        """Seconds per draft depth of a depth-``k`` proposal after a verify step, measured on a
        throwaway request over ``prompt_hidden`` (the engine's calibration). Each timed proposal
        first catches up m pending pairs, m = 1 .. k + 1 as after m - 1 accepted tokens, so every
        shape a real step runs is built once (warm-up round) before it is timed. ``between``
        (untimed) runs before each proposal: the engine's target forward, which in serving evicts
        the head's weights from the caches before every draft (back to back, drafts measured
        about half their cost in serving)."""
        rid = "\0calibrate"
        n = len(prompt_hidden)
        ids = [0] * n
        self.start(rid, ids, 0, prompt_hidden)
        params = SamplingParams(max_tokens=k + 1)
        req = self._requests[rid]
        times: list[float] = []
        try:
            self.propose(rid, ids + [0], k, params)  # the prompt's catch-up: a one-off
            for rep in range(reps + 1):  # round 0 warms up and is discarded
                for m in range(1, min(k + 1, n) + 1):
                    req.cache.length = max(0, req.n - req.start - m)  # m pairs pending
                    if between is not None:
                        between()
                    start = time.perf_counter()
                    self.propose(rid, ids + [0], k, params)
                    if rep:
                        times.append(time.perf_counter() - start)
        finally:
            self.finish(rid, [])
        return sorted(times)[len(times) // 2] / k

    # ---- proposing ----

    def propose(self, request_id: str, tokens: list[int], k: int,
                params: SamplingParams) -> Proposal:
        version = self.head.version
        if k <= 0:  # must not touch the head: pending pairs wait for the next k > 0
            return Proposal((), (), None, version)
        req = self._requests[request_id]
        if len(tokens) != req.n + 1 or tokens[-1] != req.last:
            raise ValueError(f"request {request_id}: {len(tokens)} tokens ending in {tokens[-1]} "
                             f"but the drafter saw {req.n + 1} ending in {req.last}")
        with torch.no_grad():
            g, logits = self._catch_up(req)
            try:
                if self.tree_width > 1:
                    return self._tree(req, g, logits, k, version)
                return self._chain(req, g, logits, k, params, version)
            finally:
                req.cache.length = req.n - req.start  # drop this proposal's speculative entries

    def _pos(self, start: int, end: int) -> torch.Tensor:
        """Positions start..end-1 as a (1, T) view of one cached arange (no per-step alloc)."""
        if end > len(self._positions) or self._positions.device != self.head.fc.weight.device:
            size = max(end, 2 * len(self._positions), 1024)
            self._positions = torch.arange(size, device=self.head.fc.weight.device)
        return self._positions[None, start:end]

    def _embed(self, target_ids: torch.Tensor) -> torch.Tensor:
        w = self.head.fc.weight
        e = self.embed[target_ids.to(self.embed.device)].to(device=w.device, dtype=w.dtype)
        return e * self.embed_scale if self.embed_scale != 1.0 else e

    def _catch_up(self, req: _Request) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the pending pairs through the head (causal over the draft cache); return the last
        output hidden (1, 1, H) and its logits (1, V_draft)."""
        if req.cached >= req.n:  # nothing pending (proposing twice): redo the last pair
            req.start = min(req.start, req.n - 1)
            req.cache.length = req.n - 1 - req.start
        if req.n - req.cached > MAX_CATCH_UP:  # long backlog: restart the context nearer the end
            req.start, req.cache.length = req.n - MAX_CATCH_UP, 0
        head, dtype = self.head, self.head.fc.weight.dtype
        g = logits = None
        self.last_catch_up = req.n - req.cached
        for s in range(req.cached, req.n, CATCH_UP_CHUNK):
            e = min(s + CATCH_UP_CHUNK, req.n)
            hidden = head.fuse(req.hid[s:e].to(dtype))[None]
            g, logits = head(hidden, self._embed(req.toks[s:e])[None], self._pos(s, e),
                             req.cache, last_only=True)
        assert g is not None and logits is not None  # cached < req.n: the loop ran
        return g[:, -1:], logits[:, -1]

    def _chain(self, req: _Request, g: torch.Tensor, logits: torch.Tensor, k: int,
               params: SamplingParams, version: int) -> Proposal:
        head, d2t = self.head, self.head.d2t
        ids: list[torch.Tensor] = []  # draft-vocab ids, (1,) each; one host sync at the end
        qs: list[torch.Tensor] = []
        gen = self._generator(req, params)
        for i in range(k):
            if i:  # step i: (g, embed(d_i)) at position n - 1 + i, over cache + earlier steps
                pos = req.n - 1 + i
                g, logits = head(g, self._embed(d2t[ids[-1]])[None], self._pos(pos, pos + 1),
                                 req.cache)
                logits = logits[:, -1]
            if params.greedy:
                ids.append(logits.argmax(-1))
            else:
                q = torch.softmax(logits.float() / params.temperature, dim=-1)
                ids.append(torch.multinomial(q, 1, generator=gen)[:, 0])
                qs.append(q)
        target = d2t[torch.cat(ids)].tolist()
        probs = None
        if qs:  # the exact q each token was drawn from, scattered into the target vocabulary
            probs = torch.zeros(k, head.config.target_vocab_size, device=d2t.device)
            probs[:, d2t] = torch.cat(qs)
        return Proposal.chain(target, probs, version)

    def _tree(self, req: _Request, g: torch.Tensor, logits: torch.Tensor, k: int,
              version: int) -> Proposal:
        """Top-w siblings at depth 1, each extended greedily; nodes ordered depth-major, so node
        d * w + b is branch b at depth d + 1, child of node (d - 1) * w + b."""
        head, d2t = self.head, self.head.d2t
        w = min(self.tree_width, head.config.draft_vocab_size)
        ids = [logits.topk(w, dim=-1).indices[0]]  # (w,)
        g = g.expand(1, w, -1)
        for i in range(1, k):
            pos = req.n - 1 + i
            # Each branch sees the committed cache plus its own earlier speculative entries,
            # which sit at cache slot (n - start) + (step - 1) * w + branch.
            own = torch.eye(w, dtype=torch.bool, device=g.device).repeat(1, i)
            mask = torch.cat((own.new_ones(w, req.n - req.start), own), dim=1)[None, None]
            g, logits = head(g, self._embed(d2t[ids[-1]])[None],
                             self._pos(pos, pos + 1).expand(1, w), req.cache, mask=mask)
            ids.append(logits[0].argmax(-1))
        return Proposal.branches(d2t[torch.cat(ids)].tolist(), w, version)

    def _generator(self, req: _Request, params: SamplingParams) -> torch.Generator | None:
        """Per-request generator when the request is seeded (reproducible drafts); else global."""
        if params.greedy or params.seed is None:
            return None
        if req.gen is None:
            req.gen = torch.Generator(device=self.head.fc.weight.device)
            # NOT the request's seed itself: the verifier's generator uses that one, and a draft
            # drawn from the same random stream as its acceptance test is biased (not lossless).
            req.gen.manual_seed((params.seed * 6364136223846793005 + 1442695040888963407) % 2**63)
        return req.gen
