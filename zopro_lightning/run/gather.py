"""``zopro-gather SWEEP_DIR``: one table from the ``summary.json`` of every run of a sweep.

Hydra's multirun writes each run in its own directory under the sweep directory; this reads
every ``summary.json`` below it and writes, next to them:

* ``summary.md``: the overrides shared by every run, once, above two tables: one row a
  *configuration* (a run's overrides less the shared ones and ``seed=``) with the mean ± sd
  across its seeds of every numeric column, then one row a run;
* ``summary.csv``: one row a run, with its full overrides (from ``.hydra/overrides.yaml``);
* ``summary_by_configuration.csv``: one row a configuration, ``<column>_mean`` and
  ``<column>_sd`` (sample sd, ``n - 1``; empty for a single run).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
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
NO_OVERRIDES = "(defaults)"
ONLY_SHARED = "(shared overrides only)"


def override_list(run_dir: Path) -> list[str]:
    """The run's Hydra overrides (``key=value`` strings); the directory name without them."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return [run_dir.name]
    return [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]


def overrides_of(run_dir: Path) -> str:
    return " ".join(override_list(run_dir)) or NO_OVERRIDES


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


# -- configurations: runs that differ only in their seed ---------------------------------------
def _tokens(row: dict) -> list[str]:
    return [] if row["overrides"] == NO_OVERRIDES else row["overrides"].split(" ")


def _is_seed(token: str) -> bool:
    return token.lstrip("+~").split("=", 1)[0] == "seed"


def shared_overrides(rows: list[dict]) -> list[str]:
    """Overrides every run has (in the first run's order)."""
    sets = [set(_tokens(row)) for row in rows]
    return [t for t in _tokens(rows[0]) if all(t in s for s in sets)] if rows else []


def configuration_of(row: dict, shared: list[str]) -> str:
    """A run's overrides less the shared ones and its seed."""
    rest = [t for t in _tokens(row) if t not in shared and not _is_seed(t)]
    return " ".join(rest) or ONLY_SHARED


def _numeric(values: list) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in present
    )


def by_configuration(rows: list[dict], shared: list[str]) -> list[dict]:
    """One row a configuration: ``configuration``, ``runs``, ``seeds``, then for each numeric
    column ``(mean, sd)`` over its runs (sd ``None`` with one value) and for each other column
    its distinct values joined by ``/``."""
    columns = [key for key in rows[0] if key not in ("overrides", "run", "seed")]
    numeric = {key for key in columns if _numeric([row.get(key) for row in rows])}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(configuration_of(row, shared), []).append(row)
    out = []
    for configuration, members in groups.items():
        seeds = [
            str(row["seed"]) if row.get("seed") is not None else _seed_override(row)
            for row in members
        ]
        entry: dict = {"configuration": configuration, "runs": len(members), "seeds": seeds}
        for key in columns:
            values = [row.get(key) for row in members if row.get(key) is not None]
            if key in numeric:
                mean = statistics.fmean(values) if values else None
                sd = statistics.stdev(values) if len(values) > 1 else None
                entry[key] = (mean, sd)
            else:
                entry[key] = "/".join(dict.fromkeys(str(v) for v in values))
        out.append(entry)
    return out


def _seed_override(row: dict) -> str:
    seeds = [t.split("=", 1)[1] for t in _tokens(row) if _is_seed(t) and "=" in t]
    return seeds[0] if seeds else "?"


# -- output -------------------------------------------------------------------------------------
def format_cell(value) -> str:
    if isinstance(value, tuple):  # (mean, sd)
        mean, sd = value
        if mean is None:
            return ""
        return f"{mean:.4g}" if sd is None else f"{mean:.4g} ± {sd:.2g}"
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def write_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """``summary.md``, ``summary.csv`` and ``summary_by_configuration.csv`` in ``out_dir``;
    returns the first two."""
    shared = shared_overrides(rows)
    configurations = by_configuration(rows, shared)
    config_header = list(configurations[0])
    markdown = [
        "Overrides shared by every run: "
        + (" ".join(f"`{t}`" for t in shared) if shared else "none"),
        "",
        f"## Mean ± sd across seeds ({len(configurations)} configurations, {len(rows)} runs)",
        "",
        *_markdown_table(
            config_header,
            [[format_cell(c[key]) for key in config_header] for c in configurations],
        ),
        "",
        "## Every run",
        "",
    ]
    run_header = list(rows[0])
    run_cells = [
        [
            " ".join(t for t in _tokens(row) if t not in shared) or ONLY_SHARED
            if key == "overrides"
            else format_cell(row[key])
            for key in run_header
        ]
        for row in rows
    ]
    markdown += _markdown_table(run_header, run_cells)
    md_path, csv_path = out_dir / "summary.md", out_dir / "summary.csv"
    md_path.write_text("\n".join(markdown) + "\n")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=run_header)
        writer.writeheader()
        writer.writerows(rows)
    with open(out_dir / "summary_by_configuration.csv", "w", newline="") as handle:
        flat = [_flatten(c) for c in configurations]
        writer = csv.DictWriter(handle, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    return md_path, csv_path


def _flatten(configuration: dict) -> dict:
    out = {}
    for key, value in configuration.items():
        if isinstance(value, tuple):
            out[f"{key}_mean"], out[f"{key}_sd"] = value
        elif isinstance(value, list):
            out[key] = " ".join(value)
        else:
            out[key] = value
    return out


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
    print(f"wrote {md_path}, {csv_path} and {args.sweep_dir / 'summary_by_configuration.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
