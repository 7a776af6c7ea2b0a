"""Per-token full-vocabulary KL(π_ref ‖ πθ) for TDPO/SparsePO: the chunked path against the dense (N, R, V) one.

    .venv/bin/python benchmarks/bench_token_kl.py --vocab 32000 --hidden 1024 --rows 4 --positions 256

Both paths compute the KL at N × R response positions from random final hidden states of a reference and a
policy and two random LM heads (V × H), then backpropagate a weighted sum of it into the policy's hidden
states (the LoRA case: the heads are frozen):

- ``dense``: both heads' full (N, R, V) logits, upcast to float32, a log-softmax over the vocabulary
  (``mmpo.token_kl.token_kl``): what a trainer that keeps the logits does.
- ``chunked``: ``mmpo.token_kl.chunked_token_kl``, ``--chunk`` positions at a time, with the policy head
  a frozen ``nn.Linear`` (what ``TDPOLoss``/``SparsePOLoss`` train LoRA with): the fused path, each chunk's
  gradient computed in the forward.
- ``chunked-checkpoint``: the same with the policy head given as a plain function, which takes the general
  path (each chunk under activation checkpointing, recomputed in the backward): what a trainable or
  adapted LM head gets.

Each path runs in a fresh child process, so that its peak is its own. Memory is measured, not estimated:
on a GPU the peak allocated CUDA memory (``torch.cuda.max_memory_allocated``) above what the inputs hold;
on the CPU the process's peak resident set above its resident set once the inputs exist (the kernel's
high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the runs; ``ru_maxrss``
where that reset is refused), with glibc told to unmap every freed block over 64 KiB
(``MALLOC_MMAP_THRESHOLD_``), so that the resident set follows the live tensors. ``tracemalloc`` would
see none of it: PyTorch's CPU tensors are not allocated through Python's allocator. Time is the median of
``--repeats`` forward + backward runs after one warm-up run (the fastest of ``--rounds`` child processes,
the paths alternating). The parent checks that the paths gave the same KL and gradient and prints the
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PATHS = ("dense", "chunked", "chunked-checkpoint")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000, help="V, vocabulary size")
    ap.add_argument("--hidden", type=int, default=1024, help="H, hidden size")
    ap.add_argument("--rows", type=int, default=4, help="N, responses (2 per pair)")
    ap.add_argument("--positions", type=int, default=256, help="R, response positions per row")
    ap.add_argument("--chunk", type=int, default=128, help="positions per chunk of the chunked path")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="hidden states and heads")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up, per child process")
    ap.add_argument("--rounds", type=int, default=1, help="child processes per path, the paths alternating")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of dense,chunked")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} is unreadable: the CPU peak needs Linux's /proc")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM; Linux >= 4.0), so it measures from now on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one path; return its peak extra memory, its median time and the KL it computed."""
    import torch

    from mmpo.token_kl import chunked_token_kl, token_kl

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    dtype = getattr(torch, args.dtype)
    # load both paths' code (autograd, checkpointing) on a toy problem first: not part of either peak
    toy_w, toy_h = torch.randn(64, 8, device=device), torch.randn(2, 3, 8, device=device, requires_grad=True)
    toy = torch.nn.Linear(8, 64, bias=False).to(device)
    (
        chunked_token_kl(toy_h, toy_h, toy, toy, chunk_size=2).sum() + token_kl(toy_h @ toy_w.T, toy(toy_h)).sum()
    ).backward()
    g = torch.Generator(device="cpu").manual_seed(0)
    n, r, h, v = args.rows, args.positions, args.hidden, args.vocab

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    ref_w, pol_w = rand(v, h, scale=h**-0.5), rand(v, h, scale=h**-0.5)  # logits of unit scale
    pol_w = ref_w + 0.1 * (pol_w - ref_w)  # a policy near its reference
    ref_h = rand(n, r, h)
    pol_h = (ref_h + 0.1 * rand(n, r, h)).requires_grad_(True)
    mask = torch.arange(r, device=device)[None] < torch.tensor([r - 3 * i for i in range(n)], device=device)[:, None]
    upstream = torch.linspace(0.5, 1.5, n * r, device=device).view(n, r)  # a non-uniform gradient

    def ref_head(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, ref_w)

    def pol_head(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, pol_w)

    pol_linear = torch.nn.Linear(h, v, bias=False, device=device, dtype=dtype).requires_grad_(False)
    pol_linear.weight.data = pol_w  # the same weights as a frozen module: the fused path

    def run() -> torch.Tensor:
        pol_h.grad = None
        if args.child == "dense":
            with torch.no_grad():
                ref_logits = ref_head(ref_h)  # (N, R, V)
            kl = token_kl(ref_logits, pol_head(pol_h), mask)
        else:
            head = pol_linear if args.child == "chunked" else pol_head
            kl = chunked_token_kl(ref_h, pol_h, ref_head, head, mask, chunk_size=args.chunk)
        (kl * upstream).sum().backward()
        return kl.detach()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base_cuda = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak_rss()
    base_rss = _status_mb("VmRSS")
    times = []
    for i in range(args.repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        kl = run()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    out = {
        "path": args.child,
        "device": str(device),
        "seconds": statistics.median(times),
        "peak_rss_above_inputs_mb": (
            _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        - base_rss,
        "kl_sum": float(kl.double().sum()),
        "kl_max": float(kl.double().max()),
        "grad_sum": float(pol_h.grad.double().abs().sum()),
    }
    if cuda:
        out["peak_cuda_above_inputs_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    out["peak_mb"] = out.get("peak_cuda_above_inputs_mb", out["peak_rss_above_inputs_mb"])
    cpu_method = "VmHWM reset" if reset else "ru_maxrss"
    out["measured_by"] = "torch.cuda.max_memory_allocated" if cuda else f"{cpu_method} - VmRSS after the inputs"
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return {}
    paths = [p for p in args.paths.split(",") if p]
    if unknown := sorted(set(paths) - set(PATHS)):
        raise SystemExit(f"unknown paths {unknown}: pick from {PATHS}")
    forwarded = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("out", "child", "rounds")]
    # glibc keeps freed blocks of up to 32 MB mapped by default (its mmap threshold grows): a fixed
    # threshold returns every freed block over 64 KiB at once, so the resident set follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    for _ in range(args.rounds):  # the paths alternate, so that a busy spell of a shared machine hits them all
        for path in paths:
            cmd = [sys.executable, str(Path(__file__).resolve()), *forwarded, f"--child={path}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            if proc.returncode:
                raise SystemExit(f"{path} failed:\n{proc.stderr[-3000:]}")
            runs[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {}
    for path, rows in runs.items():  # the fastest round's time, the largest round's peak
        results[path] = min(rows, key=lambda row: row["seconds"]) | {
            "peak_mb": max(row["peak_mb"] for row in rows),
            "round_seconds": [row["seconds"] for row in rows],
        }
    n, r, v = args.rows, args.positions, args.vocab
    print(f"token KL: N={n} rows x R={r} positions, V={v}, H={args.hidden}, {args.dtype}, chunk={args.chunk}")
    print(f"  one (N, R, V) float32 tensor: {n * r * v * 4 / 2**20:.1f} MB")
    for path, row in results.items():
        print(
            f"  {path:18s} peak {row['peak_mb']:9.1f} MB above the inputs ({row['measured_by']}), "
            f"{row['seconds'] * 1000:9.1f} ms forward+backward on {row['device']}"
        )
    report: dict[str, Any] = {"settings": vars(args) | {"python": platform.python_version()}, "results": results}
    report["ratios"] = {}
    dense = results.get("dense")
    for path, row in results.items():
        if dense is None or path == "dense":
            continue
        ratios = {
            "peak_memory_over_dense": row["peak_mb"] / max(dense["peak_mb"], 1e-9),
            "time_over_dense": row["seconds"] / dense["seconds"],
            "kl_sum_relative_difference": abs(row["kl_sum"] - dense["kl_sum"]) / max(abs(dense["kl_sum"]), 1e-30),
            "grad_sum_relative_difference": abs(row["grad_sum"] - dense["grad_sum"]) / max(dense["grad_sum"], 1e-30),
        }
        report["ratios"][path] = ratios
        print(
            f"  {path}/dense: peak memory x{ratios['peak_memory_over_dense']:.3f}, "
            f"time x{ratios['time_over_dense']:.2f}; relative differences: KL sums "
            f"{ratios['kl_sum_relative_difference']:.1e}, gradient sums {ratios['grad_sum_relative_difference']:.1e}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
