"""What the draft-length policy's cost model prices at start: an engine arm built as the bench
builds it (calibration included), three times, printing the calibrated verify times of 1, 4, 7
and 10 tokens (a width-3 tree at depths 0-3) and the priced ratio of a depth-2 forward to a
depth-1 one. Usage: python scripts/calibration_prices.py [ARM] (default static:runs/head-chat@nolookup)."""

from __future__ import annotations

import sys

import torch

from aurora_spec.bench.arms import ArmOptions, BenchTarget, EngineArm, build_arm, parse_arms
from aurora_spec.config import ModelConfig
from aurora_spec.runtime import load_target


def main() -> None:
    spec = parse_arms(sys.argv[1] if len(sys.argv) > 1 else "static:runs/head-chat@nolookup")[0]
    torch.set_num_threads(2)
    info, tokenizer, model = load_target(ModelConfig())
    target = BenchTarget(info, tokenizer, model, 2048, ())
    for i in range(3):
        arm = build_arm(target, spec, ArmOptions())
        assert isinstance(arm, EngineArm), spec.name
        costs = arm.engine.costs
        ms = {k: round(v * 1e3, 1) for k, v in sorted(costs.times.items()) if k in (1, 4, 7, 10)}
        print(i, ms, "measured t7/t4 %.3f" % (costs.times[7] / costs.times[4]),
              "priced t7/t4 %.3f" % (costs.verify_time(7) / costs.verify_time(4)),
              "draft ms %.2f" % (costs.draft_token_s * 1e3))


if __name__ == "__main__":
    main()
