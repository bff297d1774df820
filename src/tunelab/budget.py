"""The bench's memory-budget search (issue 12's "7B QLoRA on a 16 GB budget"): the largest micro-batch that trains
under a CUDA memory cap, for tunelab (`tunelab.bench --memory-budget-gib`) and for a peer script.

`largest_fitting` searches batch sizes: doubling from `start` until one runs out of memory, then halving the gap
between the largest that fitted and the smallest that did not, down to `resolution` (a third) of the former. The peer's
side runs as `python -m tunelab.budget --peer PATH ...`: one process that caps its memory with
`torch.cuda.set_per_process_memory_fraction`, loads the peer script as a module (its own `main` is not run) and
calls its `measure` once per probed batch size, printing one `RESULT <json>` line per probe. This module imports
only torch before the peer does: Unsloth must be imported before transformers and peft.
"""

from __future__ import annotations

import argparse
import gc
import json
import runpy
import sys
from typing import Callable


def out_of_memory(error: str | None) -> bool:
    return bool(error) and ("OutOfMemoryError" in error or "out of memory" in error.lower())


def largest_fitting(probe: Callable[[int], dict], start: int, limit: int, resolution: float = 1 / 3) -> list[dict]:
    """Every probe's result (each with `batch`, `fits`), in the order run. `probe(batch)` returns a dict with
    `error` on failure; a failure other than running out of memory ends the search."""
    results, fitted, failed, batch = [], 0, None, start
    while batch and batch <= limit:
        result = dict(probe(batch), batch=batch)
        result["fits"] = "error" not in result
        results.append(result)
        if result["fits"]:
            fitted = batch
        elif out_of_memory(result["error"]):
            failed = batch
        else:
            break
        if failed is None:
            batch *= 2
        else:
            gap = failed - fitted
            batch = fitted + gap // 2 if gap > max(1, int(fitted * resolution)) else 0
    return results


def cap_memory(budget_gib: float) -> float:
    """Cap this process's CUDA memory at `budget_gib`; return the fraction of the card that is."""
    import torch

    fraction = budget_gib * 1024 ** 3 / torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(fraction, 1.0))
    return fraction


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.budget", description=__doc__.splitlines()[0])
    parser.add_argument("--peer", required=True, help="peer script with measure(path, method, batch, steps=, "
                                                      "seq_len=, arch=) (../shared/peers/peer_unsloth.py)")
    parser.add_argument("--arch", required=True)
    parser.add_argument("--method", required=True, help="the peer's method name (qlora, lora)")
    parser.add_argument("--model-root", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--budget-gib", type=float, required=True)
    parser.add_argument("--start", type=int, default=8)
    parser.add_argument("--limit", type=int, default=256)
    args = parser.parse_args(argv)
    import torch

    fraction = cap_memory(args.budget_gib)
    peer = runpy.run_path(args.peer, run_name="tunelab_budget_peer")
    path = f"{args.model_root}/{args.arch}"

    def probe(batch: int) -> dict:
        gc.collect()
        torch.cuda.empty_cache()
        allocated = torch.cuda.memory_allocated() / 1024 ** 3  # left over from earlier probes: shown, not hidden
        try:
            result = peer["measure"](path, args.method, batch, steps=args.steps, seq_len=args.seq_len, arch=args.arch)
        except Exception as err:  # noqa: BLE001  (running out of memory is the answer here)
            result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        result.update(batch=batch, allocated_before_gib=allocated, memory_fraction=fraction, budget_gib=args.budget_gib)
        print("RESULT " + json.dumps(result), flush=True)
        return result

    largest_fitting(probe, args.start, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
