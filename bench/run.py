"""The benchmark suite in one command: each part writes its JSON under ``bench/results/``, then
``bench/report.py`` rewrites the README's benchmark section from those files.

    python bench/run.py --quick      # a few minutes, smallest settings, into bench/results/quick/
    python bench/run.py              # the full suite (about an hour on a 2-core CPU)
    python bench/run.py --parts schedules,peer_trl
    python bench/run.py --device cuda   # on a GPU machine: step cost at GPU sizes

Parts: ``schedules`` (the paper's comparison: first-order, first-order then ZOPrO or Gaussian,
fully zeroth-order; 5 seeds), ``profile_update`` (where an update's time goes), ``peer_trl``
(TRL's RLOOTrainer on the same work), ``step_cost`` (ZO step vs forward vs FO step),
``step_cost_batch128`` (the same at the default run's update batch: 16 prompts x 8
completions),
``communication`` (bytes per update under 2-process DDP). Needs ``pip install -e ".[bench]"``
for ``peer_trl``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

B128_JSON = str(HERE / "results" / "step_cost_cpu_b128.json")
BATCH128 = ["--batch", "128", "--seq", "64", "--repeats", "5", "--out", B128_JSON]
QUICK_DIR = HERE / "results" / "quick"  # a smoke run does not overwrite the real results


def quick_out(part: str) -> list[str]:
    return ["--out", str(QUICK_DIR / f"{part}.json")]


QUICK = {  # part: (script, arguments)
    "schedules": (
        "schedules",
        ["--seeds", "0", "--methods", "first_order", "zopro", "--workdir", str(QUICK_DIR / "work"),
         *quick_out("schedules"), "--common", "loop.iterations=2", "--common",
         "loop.steps_per_iteration=5", "--common", "loop.first_order_steps=5", "--common",
         "reward_model.epochs=1"],
    ),
    "peer_trl": ("peer_trl", ["--quick", *quick_out("peer_trl")]),
    "step_cost": ("step_cost", ["--sizes", "small", "--repeats", "2", *quick_out("step_cost")]),
    "communication": ("communication", ["--sizes", "tiny", "--steps", "2", *quick_out("comm")]),
}
FULL = {
    "schedules": ("schedules", []),
    "profile_update": ("profile_update", []),
    "peer_trl": ("peer_trl", []),
    "step_cost": ("step_cost", ["--sizes", "small,medium"]),
    "step_cost_batch128": ("step_cost", ["--sizes", "small,medium", *BATCH128]),
    "communication": ("communication", []),
}
GPU = {"step_cost": ("step_cost", ["--device", "cuda", "--sizes", "medium,large", "--batch", "64"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default=None, help="comma list (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    plan = GPU if args.device == "cuda" else (QUICK if args.quick else FULL)
    parts = args.parts.split(",") if args.parts else list(plan)
    unknown = sorted(set(parts) - set(plan))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {sorted(plan)}")
    for part in parts:
        script, arguments = plan[part]
        command = [sys.executable, str(HERE / f"{script}.py"), *arguments]
        print(f"== {part}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        print(f"== {part}: {time.perf_counter() - start:.0f} s", flush=True)
    if not args.quick:
        subprocess.run([sys.executable, str(HERE / "report.py")], check=True)
    else:
        print(f"quick mode: results in {QUICK_DIR}; the README's tables are left as they are")


if __name__ == "__main__":
    main()
