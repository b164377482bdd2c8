"""Forward + backward cost of every registered strategy against plain ``pg_is``.

Usage: python benchmarks/strategies.py [--batch 64] [--time 1024] [--repeats 20]

Each strategy runs in a fresh process: time is the median of ``--repeats`` forward+backward
passes (strategy, metrics and token-mean aggregation) after a warm-up call; peak memory is the
growth of the process's peak resident set over the inputs, in MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(name: str, batch: int, length: int, repeats: int,
            threads: int | None = None) -> dict[str, float]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from trustregion.functional import aggregate
    from trustregion.strategies import TokenBatch, get_strategy

    gen = torch.Generator().manual_seed(0)
    behavior_logp = (torch.rand(batch, length, generator=gen) * 0.9 + 0.05).log()
    logp = (behavior_logp + 0.3 * torch.randn(batch, length, generator=gen)).clamp(max=-1e-4)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    advantages = torch.randn(batch, generator=gen)
    k = 4
    topk_behavior = (torch.rand(batch, length, k, generator=gen) / k).log()
    topk_policy = (torch.rand(batch, length, k, generator=gen) / k).log()
    strategy = get_strategy(name)
    leaf = logp.clone().requires_grad_(True)

    def step() -> None:
        tokens = TokenBatch(logp=leaf, behavior_logp=behavior_logp, advantages=advantages,
                            mask=mask, topk_logp=topk_policy, topk_behavior_logp=topk_behavior)
        out = strategy(tokens)
        aggregate(out.token_loss, mask, "token-mean").backward()
        leaf.grad = None

    step()  # warm-up; also runs the one-off input finiteness check
    baseline = _rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": 1000 * statistics.median(times), "peak_mib": max(0.0, peak - baseline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--time", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.time, args.repeats, args.threads)))
        return

    from trustregion.strategies import available_strategies

    results = {}
    for name in available_strategies():
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(args.batch),
               "--time", str(args.time), "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        results[name] = json.loads(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])
    base = results["pg_is"]
    print(f"B={args.batch} T={args.time}, forward+backward incl. metrics, median of "
          f"{args.repeats} (CPU, {args.threads or _threads()} threads)")
    print(f"{'strategy':<16}{'ms':>9}{'× pg_is':>9}{'peak MiB':>10}{'× pg_is':>9}")
    for name, r in results.items():
        print(f"{name:<16}{r['ms']:>9.2f}{r['ms'] / base['ms']:>9.2f}{r['peak_mib']:>10.1f}"
              f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):>9.2f}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
