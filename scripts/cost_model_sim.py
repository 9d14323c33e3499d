"""The draft-length policy's cost model (drafters/policy.py, CostModel) on simulated forward times,
with the host's speed learnt (``speed_ema`` 0.5, the default) and without (0: each size learns
alone, the model before). Three cases, each over several noise seeds, reported as how far the
model's ratio of two sizes' times ends from the true ratio (1.00 = exact):
- stall: 40 one-token forwards 3.5x slow (the policy was not drafting), then 200 of 7 tokens;
- calibration: a 4-token forward calibrated 1.5x too dear, then 60 verifies, 3 in 4 of 4 tokens;
- drift: the host's speed wanders by up to 3% a forward within 0.6-2x, 2000 verifies of 1 or 4
  tokens: the spread (min-max) of the ratio over the last 1800.
Usage: python scripts/cost_model_sim.py [--noise 0.07] [--seeds 5]"""

from __future__ import annotations

import argparse
import random
import statistics

from aurora_spec.drafters.policy import CostModel


def model(speed_ema: float, times: dict[int, float]) -> CostModel:
    c = CostModel(speed_ema=speed_ema)
    c.times.update(times)
    return c


def stall(speed_ema: float, rng: random.Random, noise: float) -> float:
    true = {1: 0.045, 4: 0.052, 7: 0.065}
    c = model(speed_ema, true)
    for slow, size in [(3.5, 1)] * 40 + [(1.0, 7)] * 200:
        c.observe_verify(size, slow * true[size] * rng.uniform(1 - noise, 1 + noise))
    return (c.verify_time(1) / c.verify_time(7)) / (true[1] / true[7])


def calibration(speed_ema: float, rng: random.Random, noise: float) -> float:
    true = {1: 0.040, 4: 0.041}
    c = model(speed_ema, {1: 0.040, 4: 0.062})
    for i in range(60):
        size = 1 if i % 4 == 0 else 4
        c.observe_verify(size, true[size] * rng.uniform(1 - noise, 1 + noise))
    return (c.verify_time(4) / c.verify_time(1)) / (true[4] / true[1])


def drift(speed_ema: float, rng: random.Random, noise: float) -> tuple[float, float]:
    true = {1: 0.045, 4: 0.052}
    c = model(speed_ema, true)
    host, ratios = 1.0, []
    for _ in range(2000):
        host = min(2.0, max(0.6, host * rng.uniform(0.97, 1.03)))
        size = 1 if rng.random() < 0.2 else 4
        c.observe_verify(size, host * true[size] * rng.uniform(1 - noise, 1 + noise))
        # The floor (more tokens never cost less) applies to the model's own times only.
        ratios.append((c.verify_time(4) / c.verify_time(1)) / (true[4] / true[1]))
    return min(ratios[200:]), max(ratios[200:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--noise", type=float, default=0.07)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    for name, speed_ema in (("speed learnt", 0.5), ("no speed (before)", 0.0)):
        seeds = [random.Random(s) for s in range(args.seeds)]
        st = statistics.mean(stall(speed_ema, r, args.noise) for r in seeds)
        seeds = [random.Random(s) for s in range(args.seeds)]
        ca = statistics.mean(calibration(speed_ema, r, args.noise) for r in seeds)
        lo, hi = drift(speed_ema, random.Random(1), args.noise)
        print(f"{name:18s} stall {st:.2f}  calibration {ca:.2f}  drift {lo:.2f}-{hi:.2f}")


if __name__ == "__main__":
    main()
