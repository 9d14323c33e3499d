"""The server on a tiny random model, for the server tests: a byte-level tokenizer, a learner
seam that records what the server asks of it, the app around them, and the target-only reference.

The app runs for real (uvicorn on a loopback port, engine thread, learner seam); only the model is
tiny and the tokenizer byte-level, so every request takes milliseconds of model time.
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx

from aurora_spec.drafters.ngram import NgramDrafter
from aurora_spec.engine.engine import Engine, EngineConfig
from aurora_spec.models.loader import ModelInfo
from aurora_spec.models.runner import CacheConfig, TargetRunner
from aurora_spec.runtime import Runtime
from aurora_spec.server.app import create_app
from aurora_spec.server.settings import ServerSettings
from aurora_spec.types import SamplingParams
from tests.tiny_models import tiny_target


class ByteTokenizer:
    """Byte-level: id = byte + 3 (0..2 are special). Decoding a split character gives U+FFFD,
    exactly the hazard of real byte-level BPE tokenizers."""

    eos_token_id = 2
    chat_template = "bytes"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.encode(text) if tokenize else text


VOCAB = 259  # 3 special ids + 256 bytes
CAPACITY = 256


class FakeLearner:
    """Records what the server asks of the learner seam."""

    def __init__(self) -> None:
        self.traces: list[str] = []
        self.calls: list[object] = []
        self.engine = None

    def attach(self, engine) -> None:
        self.engine = engine

    def start(self) -> None:
        self.calls.append("start")

    def stop(self, save: bool = True) -> None:
        self.calls.append(("stop", save))

    def trace_sink(self, trace) -> None:
        self.traces.append(trace.request_id)

    def status(self) -> dict:
        return {"learning": True, "live_version": 3, "trainer_step": 7, "loss": math.nan,
                "buffer_fill": 0.25, "dropped_traces": 1, "swaps": 2, "rollbacks": 0,
                "vocab_coverage": 0.9, "vocab_coverage_unseen": 0.85, "paused": False,
                "note": object()}

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def swap_now(self) -> bool:
        self.calls.append("swap")
        return True

    def rollback(self) -> bool:
        self.calls.append("rollback")
        return False

    def reset(self) -> None:
        self.calls.append("reset")


def tiny_runtime(learner, slots: int = 2) -> Runtime:
    model, _ = tiny_target("llama", seed=1, vocab=VOCAB)
    runner = TargetRunner(model, CacheConfig(max_slots=slots, capacity=CAPACITY))
    engine = Engine(runner, NgramDrafter(), EngineConfig(calibrate=False),
                    trace_sink=learner.trace_sink)
    info = ModelInfo("tiny", Path("/nonexistent/tiny-llama"), "LlamaForCausalLM", "llama", 512,
                     VOCAB, 48, 4, (2,))
    return Runtime(info, ByteTokenizer(), model, engine)


def tiny_app(slots: int = 2, **settings):
    learner = FakeLearner()
    app = create_app(tiny_runtime(learner, slots), learner,
                     ServerSettings(model_name="tiny", max_tokens_limit=200, **settings))
    return app, learner


def reference(prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Target-only greedy on a fresh engine over the same tiny model."""
    model, _ = tiny_target("llama", seed=1, vocab=VOCAB)
    engine = Engine(TargetRunner(model, CacheConfig(1, CAPACITY)), None,
                    EngineConfig(calibrate=False))
    return list(engine.generate(prompt_ids, SamplingParams(max_tokens, stop_token_ids=(2,))).token_ids)


def post(url: str, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, dict | list):
        return httpx.post(url + path, json=body, timeout=30, **kw)
    return httpx.post(url + path, content=body, timeout=30,
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)
