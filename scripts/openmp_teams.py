"""Target-only decoding on the thread that loaded the model vs on a second thread (what `aurora
serve`'s engine thread is). Each thread that runs torch CPU kernels gets an OpenMP team of its
own; with more managed threads than cores, libgomp stops spinning at barriers and the CPUs idle
between kernels (aurora_spec/threads.py). Prints tokens/s and the CPU idle share per case.

    python scripts/openmp_teams.py
"""

import statistics
import threading

import psutil
import torch

from aurora_spec.bench.arms import ArmOptions, BenchTarget, build_arm, parse_arms
from aurora_spec.bench.traffic import load_domain, resolve_traffic_dir
from aurora_spec.cli import encode_prompt, resolve_chat, stop_token_ids
from aurora_spec.config import ModelConfig
from aurora_spec.runtime import load_target


def main() -> None:
    torch.set_num_threads(2)
    info, tok, model = load_target(ModelConfig())
    chat = resolve_chat(tok, None)
    prompts = load_domain(resolve_traffic_dir(None), "code")[:6]
    ids = [encode_prompt(tok, p.prompt, chat) for p in prompts]
    target = BenchTarget(info, tok, model, 2048, stop_token_ids(info, tok), torch.float32)
    none = build_arm(target, parse_arms("none")[0], ArmOptions())

    def timed(label: str) -> None:
        psutil.cpu_times_percent(interval=None)  # the idle share below is measured from here
        tps = [none.run(ids[i % len(ids)], 64, "code", f"{label}{i}").tokens_per_s or 0.0
               for i in range(6)]
        idle = psutil.cpu_times_percent(interval=None).idle / 100
        print(f"{label:14s} {statistics.median(tps):.1f} tokens/s, CPU idle {idle:.0%}", flush=True)

    for _ in range(2):
        timed("main thread")
        t = threading.Thread(target=timed, args=("second thread",))
        t.start()
        t.join()


if __name__ == "__main__":
    main()
