"""``zopro-gather SWEEP_DIR``: one table from the ``summary.json`` of every run of a sweep.

Hydra's multirun writes each run in its own directory under the sweep directory; this reads
every ``summary.json`` below it and writes ``summary.md`` (Markdown) and ``summary.csv`` next to
them, one row a run, with the run's overrides (from ``.hydra/overrides.yaml``) as its label.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

COLUMNS = (
    "task",
    "sampler",
    "optimizer",
    "seed",
    "policy_steps",
    "gold_reward_initial",
    "gold_reward_after_first_order",
    "gold_reward_final",
    "policy_reward_initial",  # datasets without a gold reward: the reward model's scores
    "policy_reward_after_first_order",
    "policy_reward_final",
    "reward_model_accuracy",
    "reward_model_pearson",  # score data (translation)
    "reward_model_spearman",
    "kl_final",
    "wall_seconds",
    "peak_memory_mb",
)


def overrides_of(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return run_dir.name
    lines = [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]
    return " ".join(lines) or "(defaults)"


def gather(sweep_dir: str | Path) -> list[dict]:
    """Rows (overrides, run directory and the summary's columns) of every run below
    ``sweep_dir``, sorted by overrides."""
    sweep_dir = Path(sweep_dir)
    paths = sorted(sweep_dir.rglob("summary.json"))
    if not paths:
        raise FileNotFoundError(
            f"no summary.json below {sweep_dir}: pass the directory of a finished sweep "
            "(e.g. multirun/sentiment/<date>)."
        )
    rows = []
    for path in paths:
        summary = json.loads(path.read_text())
        row = {
            "overrides": overrides_of(path.parent),
            "run": str(path.parent.relative_to(sweep_dir)),
        }
        row.update({key: summary.get(key) for key in COLUMNS})
        rows.append(row)
    empty = [key for key in COLUMNS if all(row.get(key) is None for row in rows)]
    rows = [{k: v for k, v in row.items() if k not in empty} for row in rows]
    return sorted(rows, key=lambda row: row["overrides"])


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    header = list(rows[0])
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(format_cell(row[key]) for key in header) + " |" for row in rows]
    md_path, csv_path = out_dir / "summary.md", out_dir / "summary.csv"
    md_path.write_text("\n".join(markdown) + "\n")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return md_path, csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        rows = gather(args.sweep_dir)
    except FileNotFoundError as error:
        print(f"zopro-gather: {error}")
        return 2
    md_path, csv_path = write_tables(rows, args.sweep_dir)
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
