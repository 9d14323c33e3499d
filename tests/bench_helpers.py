"""Shared set-up for the bench unit tests (test_bench.py, test_bench_arms.py): a planned request
for the runner."""

from __future__ import annotations

from aurora_spec.bench.traffic import PlannedRequest, Prompt


def planned(i: int) -> PlannedRequest:
    """Request i of a chat test prompt, planned at time 0."""
    return PlannedRequest(Prompt(f"p{i}", "chat", "test", f"prompt {i}"), 0)
