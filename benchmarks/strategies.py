"""Forward + backward cost of every registered strategy against plain ``pg_is``.

Usage: python benchmarks/strategies.py [--batch 64] [--time 1024] [--repeats 20]

Every registered strategy at its defaults, plus the DPPO divergences other than the default
(``binary_kl``, ``topk_tv``, ``topk_kl``, top-K with K = 8) and ratio clipping with a dual clip.
Each runs in a fresh process: time is the median of ``--repeats`` forward+backward passes
(strategy, metrics and token-mean aggregation) after a warm-up call.

Peak memory is the most memory the pass holds at once beyond its inputs: the process runs with
glibc's ``MALLOC_MMAP_THRESHOLD_`` at 64 KiB, so every tensor of the pass (a [B, T] float32
tensor is 256 KiB) gets its own mapping and is returned to the system when freed; the peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the pass) minus the
resident set before it is then the peak of live tensor memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    "dppo(binary_kl)": {"name": "dppo", "divergence": "binary_kl"},
    "dppo(topk_tv)": {"name": "dppo", "divergence": "topk_tv"},
    "dppo(topk_kl)": {"name": "dppo", "divergence": "topk_kl"},
    "ratio_clip(dual_clip_cap=3)": {"name": "ratio_clip", "dual_clip_cap": 3.0},
}
"""Label → strategy spec, measured besides every registered strategy at its defaults."""

MMAP_THRESHOLD = 64 * 1024


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set


def measure(spec: dict[str, Any], batch: int, length: int, repeats: int,
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
    k = 9  # K = 8 tracked tokens (DPPO's default divergence_top_k) + the sampled token's slot
    topk_behavior = (torch.rand(batch, length, k, generator=gen) / k).log()
    topk_policy = (torch.rand(batch, length, k, generator=gen) / k).log()
    settings = dict(spec)
    strategy = get_strategy(settings.pop("name"), **settings)
    leaf = logp.clone().requires_grad_(True)

    def step() -> None:
        tokens = TokenBatch(logp=leaf, behavior_logp=behavior_logp, advantages=advantages,
                            mask=mask, topk_logp=topk_policy, topk_behavior_logp=topk_behavior)
        out = strategy(tokens)
        aggregate(out.token_loss, mask, "token-mean").backward()
        leaf.grad = None

    step()  # warm-up; also runs the one-off input finiteness check
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") == str(MMAP_THRESHOLD):
        baseline = _status_mib("VmRSS")
        _reset_peak_rss()
        step()
        return {"peak_mib": max(0.0, _status_mib("VmHWM") - baseline)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times)}


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
        print(json.dumps(measure(json.loads(args.one), args.batch, args.time, args.repeats,
                                 args.threads)))
        return

    from trustregion.strategies import available_strategies

    specs = {name: {"name": name} for name in available_strategies()} | SETTINGS
    plain = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    mapped = {**plain, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    results: dict[str, dict[str, float]] = {}
    for label, spec in specs.items():
        cmd = [sys.executable, __file__, "--one", json.dumps(spec), "--batch", str(args.batch),
               "--time", str(args.time), "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        results[label] = {}
        for env in (plain, mapped):
            output = subprocess.check_output(cmd, text=True, env=env)
            results[label].update(json.loads(output.strip().splitlines()[-1]))
    base = results["pg_is"]
    print(f"B={args.batch} T={args.time}, forward+backward incl. metrics, median of "
          f"{args.repeats} (CPU, {args.threads or _threads()} threads)")
    print(f"{'strategy':<30}{'ms':>8}{'× pg_is':>9}{'peak MiB':>10}{'× pg_is':>9}")
    for label, r in results.items():
        print(f"{label:<30}{r['ms']:>8.2f}{r['ms'] / base['ms']:>9.2f}{r['peak_mib']:>10.1f}"
              f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):>9.2f}")
    worst = max(results, key=lambda label: results[label]["ms"] / base["ms"])
    ratio = results[worst]["ms"] / base["ms"]
    print(f"slowest relative to pg_is: {worst} at {ratio:.2f}× (target ≤ 3×: "
          f"{'met' if ratio <= 3 else 'MISSED'})")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
