"""Shared pytest fixtures. Keep each fixture small and documented; group by subsystem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One intra-op thread: the test models are small (threads only add synchronisation), and tests
# must not fight over the machine's two cores with servers or trainers they start.
torch.set_num_threads(1)


@pytest.fixture
def two_threads():
    """The calling (serving) thread on 2 torch threads, as the learner splits them; restored
    afterwards."""
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(outer)


# ---- models ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a HF dir, in the default cache (shared by the session).

    The first use on a machine converts the GGUF (~20-40 s); scripts/setup.sh normally did that.
    """
    from aurora_spec.models.loader import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_target(smollm2_dir: Path):
    """(ModelInfo, tokenizer, DecoderModel) for SmolLM2 in float32, loaded once per session."""
    from aurora_spec.config import ModelConfig
    from aurora_spec.runtime import load_target

    return load_target(ModelConfig(model=str(smollm2_dir)))
