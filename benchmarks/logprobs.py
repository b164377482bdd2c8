"""Peak extra memory and time of per-token log-probs: naive log-softmax vs ``token_logprobs``.

    python benchmarks/logprobs.py [--batch 8] [--time 512] [--vocab 49152] [--dtype bfloat16]

Every measurement runs in a fresh subprocess so that peaks do not leak between them. Without
accelerator memory statistics, host memory is measured: the resident set size (RSS) is read once
the logits and ids exist and have been touched, and the process' high-water mark
(``ru_maxrss``) after the operation. Peak extra = high-water mark − RSS before, i.e. everything the
operation needed beyond its inputs (for forward+backward this includes the logits' gradient).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from trustregion.functional.logprobs import token_logprobs

MIB = 2**20
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
METHODS = ("naive", "token_logprobs")
PASSES = ("forward", "fwd+bwd")


def naive_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]


def _op(method: str, chunk_size: int | None):
    if method == "naive":
        return naive_logprobs
    return lambda logits, ids: token_logprobs(logits, ids, chunk_size=chunk_size)


def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the resident set size")


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits drawn directly in their dtype (no float32 staging copy to inflate the peak)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(args.batch, args.time, args.vocab, dtype=DTYPES[args.dtype])
    for row in logits.view(-1, args.vocab).split(256):
        row.normal_(generator=gen).mul_(3.0)
    ids = torch.randint(0, args.vocab, (args.batch, args.time), generator=gen)
    return logits, ids


def _run(fn, logits: torch.Tensor, ids: torch.Tensor, backward: bool) -> None:
    out = fn(logits, ids)
    if backward:
        out.sum().backward()


def worker_measure(args: argparse.Namespace, method: str, which: str) -> dict[str, float]:
    fn, backward = _op(method, args.chunk_size), which == "fwd+bwd"
    # Warm up on a tiny input so one-off library initialisation is not counted.
    small = torch.randn(2, 3, 17, dtype=DTYPES[args.dtype], requires_grad=True)
    _run(fn, small, torch.randint(0, 17, (2, 3)), backward=True)

    logits, ids = _inputs(args)
    logits.requires_grad_(backward)
    float(logits.detach().sum()) + float(ids.sum())  # touch every page of both inputs
    gc.collect()
    rss_before, maxrss_before = _rss_bytes(), _maxrss_bytes()

    start = time.perf_counter()
    _run(fn, logits, ids, backward)
    times = [time.perf_counter() - start]
    peak_extra = _maxrss_bytes() - rss_before

    for _ in range(args.repeats - 1):
        logits.grad = None
        gc.collect()
        start = time.perf_counter()
        _run(fn, logits, ids, backward)
        times.append(time.perf_counter() - start)
    return {
        "peak_extra": peak_extra,
        "stale_peak": max(0, maxrss_before - rss_before),  # should be ~0 for a fair measurement
        "time": statistics.median(times),
    }


def worker_diff(args: argparse.Namespace) -> dict[str, float]:
    logits, ids = _inputs(args)
    logits.requires_grad_(True)
    results = []
    for method in METHODS:
        out = _op(method, args.chunk_size)(logits, ids)
        out.sum().backward()
        assert logits.grad is not None
        results.append((out.detach(), logits.grad))
        logits.grad = None
    (naive, naive_grad), (ours, ours_grad) = results
    exact = torch.log_softmax(logits.detach().double(), -1).gather(-1, ids[..., None])[..., 0]
    return {
        "value": float((naive - ours).abs().max()),
        "grad": float((naive_grad.float() - ours_grad.float()).abs().max()),
        "naive_vs_float64": float((naive.double() - exact).abs().max()),
        "ours_vs_float64": float((ours.double() - exact).abs().max()),
    }


def _spawn(argv: list[str], worker: str) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", worker]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {worker!r} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="B (default 8)")
    parser.add_argument("--time", type=int, default=512, help="T, sequence length (default 512)")
    parser.add_argument("--vocab", type=int, default=49152, help="V (default 49152)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; median reported")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "diff":
        print(json.dumps(worker_diff(args)))
        return
    if args.worker is not None:
        method, which = args.worker.split("/")
        print(json.dumps(worker_measure(args, method, which)))
        return

    argv = [
        f"--batch={args.batch}",
        f"--time={args.time}",
        f"--vocab={args.vocab}",
        f"--dtype={args.dtype}",
        f"--repeats={args.repeats}",
    ]
    if args.chunk_size is not None:
        argv.append(f"--chunk-size={args.chunk_size}")

    n_rows = args.batch * args.time
    chunk_rows = args.chunk_size or max(1, 2**24 // args.vocab)
    logits_mib = n_rows * args.vocab * DTYPES[args.dtype].itemsize / MIB
    print(
        f"B={args.batch} T={args.time} V={args.vocab} dtype={args.dtype} "
        f"logits={logits_mib:.0f} MiB chunk={chunk_rows} rows "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )

    rows = {}
    for which in PASSES:
        for method in METHODS:
            rows[method, which] = _spawn(argv, f"{method}/{which}")

    header = f"{'pass':<9} {'method':<15} {'peak extra MiB':>14} {'x logits':>9} {'time s':>8}"
    print(header)
    print("-" * len(header))
    for which in PASSES:
        for method in METHODS:
            r = rows[method, which]
            stale = r["stale_peak"] / MIB
            note = f"  (earlier peak {stale:.0f} MiB above baseline)" if stale > 16 else ""
            print(
                f"{which:<9} {method:<15} {r['peak_extra'] / MIB:>14.1f} "
                f"{r['peak_extra'] / MIB / logits_mib:>9.2f} {r['time']:>8.3f}{note}"
            )
    print()
    for which in PASSES:
        naive, ours = rows["naive", which], rows["token_logprobs", which]
        memory = ours["peak_extra"] / naive["peak_extra"]
        print(
            f"{which:<9} memory token_logprobs/naive = {memory:.3f}"
            f"   time token_logprobs/naive = {ours['time'] / naive['time']:.2f}"
        )
    diff = _spawn(argv, "diff")
    print(f"max |Δ log p| = {diff['value']:.3e}   max |Δ grad| = {diff['grad']:.3e}")
    print(f"max |log p − float64 log p|: naive {diff['naive_vs_float64']:.3e}, "
          f"token_logprobs {diff['ours_vs_float64']:.3e} (float32 rounding at |log p| up to "
          "about 30 is a few 1e-6 per operation)")
    ratio = rows["token_logprobs", "forward"]["peak_extra"] / rows["naive", "forward"]["peak_extra"]
    verdict = "met" if ratio <= 0.25 else "MISSED"
    print(f"target forward peak extra <= 1/4 of naive: {verdict} ({ratio:.3f})")


if __name__ == "__main__":
    main()
