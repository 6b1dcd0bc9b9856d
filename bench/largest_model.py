"""The largest random-initialised Llama each training mode runs on this machine, measured.

For each mode (full-parameter ZO-SGD in bf16 with the beta > 0 reference; full-parameter
AdamW as users run it, float32 master weights with bf16 autocast and activation
checkpointing; LoRA ZO; LoRA AdamW with checkpointing) and each size, smallest first, a fresh
subprocess (``bench/largest_model_worker.py``) runs a few real ``ZOPrOModule`` policy updates
(rollout with generation, reference log-probs, the update) under a Lightning ``Trainer`` and
records the peak memory the process holds: ``RssAnon + RssShmem`` (``/proc/self/status``)
sampled every ~10 ms. Pages of memory-mapped files (``RssFile``) are page cache and are not
counted. In the same process, the peak of a plain no-grad forward of the update's batch gives
the ratio "update peak / inference forward peak".

A size does not fit when its child is killed: by this driver once its memory passes the cap
(default: 21 GB or MemAvailable less 1 GB, whichever is smaller; checked every 20 ms), or by
the kernel. Before launching, the peak is estimated from the mode's previous size (bytes per
parameter) and a size over the cap is not tried. A mode stops at its first size that does not
fit. The machine never swaps: the cap is below what is free. A child stopped by the time limit
(``--child-timeout``) is recorded as not finished, which says nothing of memory.

    python bench/largest_model.py                        # every mode, 0.5B .. 8B
    python bench/largest_model.py --modes zo_full --sizes 0.2B,0.5B
    python bench/largest_model.py --sizes tiny --out /tmp/x.json   # smoke test
    # sweeps run apart (two at once, each with its own --out), then one JSON of them:
    python bench/largest_model.py --merge a.json b.json

On the shared 2-core machine a full-parameter ZO update of a 1 B model took 4-8 minutes (the
draws of z for every weight, three times an update, dominate), so the sweep behind
``bench/results/largest_model.json`` ran 0.1-1 B per mode (its ``commands``).

Writes ``bench/results/largest_model.json`` and prints a table; then
``python bench/gpu_extrapolation.py`` fits peak bytes against parameters per mode and
extrapolates to one 80 GB device.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# the worktree's package, not an installed copy (a script's sys.path starts at bench/)
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from common import RESULTS, environment, write_results  # noqa: E402
from largest_model_worker import MODES, SIZES, llama_params, worker  # noqa: E402

from zopro_lightning.run.memory_check import meminfo_available_bytes  # noqa: E402

# glibc: tensors of 128 KiB and more are mmap'ed and unmapped when freed, so the resident set
# follows the live tensors (and the forward's window is not inflated by freed heap)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
#: bytes per parameter assumed for a mode's first size (before any measurement), generous
PRIOR_BYTES_PER_PARAM = {"zo_full": 4.0, "adamw_full": 24.0, "zo_lora": 3.0, "adamw_lora": 4.0}
#: the process's own memory besides the model (torch, transformers, lightning), for estimates
PROCESS_MB = 1200.0
DEFAULT_SIZES = "0.5B,1B,2B,4B,8B"


def child_resident_bytes(pid: int) -> int:
    """``RssAnon + RssShmem`` of process ``pid`` (0 once it is gone)."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def cap_bytes(cap_gb: float) -> int:
    """The memory a child may hold: ``cap_gb`` or what is available less 1 GB."""
    return int(min(cap_gb * 1e9, meminfo_available_bytes() - 1e9))


def estimate_bytes(mode: str, size: str, done: list[dict], prior: float | None = None) -> float:
    """The peak expected of ``mode`` at ``size``: the mode's last measured bytes per parameter
    (above the process) times its parameters, plus the process; before any, ``prior`` (a
    figure measured by an earlier sweep) or :data:`PRIOR_BYTES_PER_PARAM`."""
    params = llama_params(*SIZES[size])
    measured = [r for r in done if r["mode"] == mode and r.get("fit")]
    prior = PRIOR_BYTES_PER_PARAM[mode] if prior is None else prior
    per_param = measured[-1]["bytes_per_param"] if measured else prior
    return per_param * params + PROCESS_MB * 2**20


def run_child(mode: str, size: str, args: argparse.Namespace, cap: int) -> dict[str, Any]:
    """The worker in a subprocess, killed if it holds more than ``cap`` bytes; its row, or a
    row saying why it does not fit."""
    command = [sys.executable, __file__, "--worker", mode, size, *settings_argv(args)]
    start = time.perf_counter()
    # files, not pipes: a pipe nobody reads during the run would block a chatty child; its own
    # TMPDIR (the reference's memory-mapped file), removed even when the child is killed
    with (
        tempfile.TemporaryDirectory(prefix="largest-model-") as scratch,
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
    ):
        env = {**os.environ, **MALLOC_ENV, "TMPDIR": scratch}
        child = subprocess.Popen(
            command, stdout=out, stderr=err, text=True, env=env, preexec_fn=die_with_parent
        )
        watched = watch(child, cap, args.child_timeout)
        child.wait()
        stdout, stderr = read_back(out), read_back(err)
    seconds = time.perf_counter() - start
    if child.returncode == 0 and watched is None:
        return json.loads(stdout.strip().splitlines()[-1]) | {"fit": True, "seconds": seconds}
    why = watched or f"exit status {child.returncode}"
    if child.returncode == -signal.SIGKILL and watched is None:
        why = "killed (SIGKILL: the kernel's OOM killer)"
    timed_out = why.startswith("over the time limit")
    return {
        "mode": mode,
        "size": size,
        "params_total": llama_params(*SIZES[size]),
        "fit": False,
        # a run stopped by the time limit says nothing about memory: not "does not fit"
        "outcome": "time_limit" if timed_out else "does_not_fit",
        "why": why,
        "seconds": seconds,
        "stderr_tail": stderr[-2000:],
    }


def die_with_parent() -> None:
    """In the child: SIGKILL when the driver dies (Linux ``prctl(PR_SET_PDEATHSIG)``), so
    no multi-GB worker outlives an interrupted sweep."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def read_back(handle: Any) -> str:
    handle.seek(0)
    return handle.read()


def watch(child: subprocess.Popen, cap: int, timeout: float) -> str | None:
    """Poll ``child`` until it exits; kill it when over ``cap`` or ``timeout``; the reason."""
    start, peak = time.monotonic(), 0
    while child.poll() is None:
        held = child_resident_bytes(child.pid)
        peak = max(peak, held)
        if held > cap:
            child.kill()
            return f"over the memory cap: {held / 1e9:.2f} GB held > {cap / 1e9:.2f} GB"
        if time.monotonic() - start > timeout:
            child.kill()
            return f"over the time limit of {timeout:.0f} s (peak so far {peak / 1e9:.2f} GB)"
        time.sleep(0.02)
    return None


def settings_argv(args: argparse.Namespace) -> list[str]:
    return [
        "--updates", str(args.updates), "--prompts", str(args.prompts), "--k", str(args.k),
        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
        "--threads", str(args.threads),
    ]  # fmt: skip


def sweep(args: argparse.Namespace, save: Callable[[list[dict]], Any]) -> list[dict]:
    """Every mode, sizes smallest first, until one does not fit (or is estimated not to);
    ``save(rows)`` after each size, so an interrupted sweep keeps what it measured."""
    rows: list[dict] = []
    for mode in args.modes.split(","):
        for size in args.sizes.split(","):
            cap = cap_bytes(args.cap_gb)
            estimate = estimate_bytes(mode, size, rows, args.prior_bytes_per_param)
            if estimate > cap:
                rows.append(skipped(mode, size, estimate, cap))
            else:
                rows.append(run_child(mode, size, args, cap) | {"estimate_mb": estimate / 2**20})
            print_row(rows[-1])
            save(rows)
            if not rows[-1]["fit"]:
                break
    return rows


def skipped(mode: str, size: str, estimate: float, cap: int) -> dict[str, Any]:
    return {
        "mode": mode,
        "size": size,
        "params_total": llama_params(*SIZES[size]),
        "fit": False,
        "why": f"not tried: estimated {estimate / 1e9:.1f} GB > cap {cap / 1e9:.1f} GB",
        "estimate_mb": estimate / 2**20,
        "seconds": 0.0,
    }


def print_row(row: dict) -> None:
    if not row["fit"]:
        verdict = "not finished" if row.get("outcome") == "time_limit" else "does not fit"
        print(f"{row['mode']:>10} {row['size']:>5}: {verdict} ({row['why']})", flush=True)
        return
    print(
        f"{row['mode']:>10} {row['size']:>5} {row['params_total'] / 1e9:6.2f} B params: "
        f"update peak {row['update_peak_mb']:8.0f} MB, forward peak {row['forward_peak_mb']:8.0f}"
        f" MB, ratio {row['update_over_forward']:.2f}, {row['bytes_per_param']:.2f} B/param, "
        f"{row['seconds']:.0f} s",
        flush=True,
    )


def previous_rows(path: Path, modes: list[str]) -> tuple[list[dict], list[str]]:
    """The rows of other modes already in ``path`` and the commands that measured them
    (``--append``)."""
    if not path.exists():
        return [], []
    result = json.loads(path.read_text())
    return [r for r in result["rows"] if r["mode"] not in modes], result.get("commands", [])


def merge(paths: list[str], out: str | None) -> Path:
    """One ``largest_model.json`` of sweeps run apart (e.g. two at once, each with its own
    ``--out``): their rows, mode by mode and size by size (a later file's row of the same mode
    and size replaces an earlier one's), and their commands."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = list({(r["mode"], r["size"]): r for part in parts for r in part["rows"]}.values())
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (order.get(r["mode"], 99), r["params_total"]))
    payload = {key: value for key, value in parts[0].items() if key not in ("rows", "largest")}
    payload["commands"] = [c for part in parts for c in part.get("commands", [])]
    payload["merged_from"] = [str(p) for p in paths]
    payload["largest"] = largest(rows)
    payload["rows"] = rows
    return write_results("largest_model", payload, out)


def largest(rows: list[dict]) -> dict[str, Any]:
    """Per mode, the largest size that fit and the ZO-over-AdamW ratio of full-parameter."""
    best = {}
    for mode in MODES:
        fits = [r for r in rows if r["mode"] == mode and r["fit"]]
        if fits:
            top = max(fits, key=lambda r: r["params_total"])
            best[mode] = {"size": top["size"], "params": top["params_total"]}
    if "zo_full" in best and "adamw_full" in best:
        best["zo_full_over_adamw_full"] = best["zo_full"]["params"] / best["adamw_full"]["params"]
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"of {', '.join(SIZES)}")
    parser.add_argument("--updates", type=int, default=2, help="policy updates per size")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per update")
    parser.add_argument("--k", type=int, default=2, help="completions per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--cap-gb", type=float, default=21.0, help="memory a child may hold")
    parser.add_argument("--child-timeout", type=float, default=1500.0, help="seconds per child")
    parser.add_argument(
        "--prior-bytes-per-param", type=float, default=None,
        help="the estimate's bytes per parameter before this sweep measured any (e.g. an "
        "earlier sweep's figure at a smaller size)",
    )  # fmt: skip
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--append", action="store_true", help="keep the other modes' rows already in --out"
    )
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="only merge the rows of sweeps run apart"
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = {
        "updates": args.updates, "prompts": args.prompts, "k": args.k,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "threads": args.threads,
    }  # fmt: skip
    if args.worker:
        print(json.dumps(worker(*args.worker, settings)))
        return
    if args.merge:
        print(f"wrote {merge(args.merge, args.out)}")
        return
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/largest_model.py " + " ".join(given)

    out = Path(args.out) if args.out else RESULTS / "largest_model.json"
    kept, earlier = previous_rows(out, args.modes.split(",")) if args.append else ([], [])

    def save(rows: list[dict]) -> Path:
        rows = kept + rows
        payload = {
            "benchmark": "largest_model",
            **environment(),
            "commands": earlier + [command.strip()],
            "memory": "peak of RssAnon + RssShmem (/proc/self/status) sampled every 10 ms; "
            "RssFile (pages of memory-mapped files on disk: page cache) not counted",
            "settings": settings,
            "cap_gb": args.cap_gb,
            "largest": largest(rows),
            "rows": rows,
        }
        return write_results("largest_model", payload, out)

    rows = sweep(args, save)
    print(json.dumps(largest(rows)))
    print(f"wrote {save(rows)}")


if __name__ == "__main__":
    main()
