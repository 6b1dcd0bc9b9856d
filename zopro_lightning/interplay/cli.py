"""``zopro-viz RUN_DIR``: the interplay analysis and plots of one run, from its snapshots.

Reads ``RUN_DIR/interplay/`` (see :mod:`.snapshots`), writes ``RUN_DIR/plots/``:
``trajectory_<method>_<2|3>d.png`` per method and dimension, ``metrics.png``,
``interplay.html`` (unless ``--no-html``) and ``interplay.json`` (the metrics of
:func:`.analysis.analyse` plus the projection notes), then prints a short summary.
Exit status 0 on success, 2 when the run directory has no snapshots or the options are bad.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .projections import METHODS, Projection, project
from .trajectory import Trajectories
from .undefined import why_not


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zopro-viz",
        description="Policy-reward interplay analysis of a ZOPrO run: trajectory plots "
        "(PCA, t-SNE, UMAP in 2-D and 3-D) and update metrics.",
    )
    p.add_argument("run_dir", type=Path, help="run directory holding interplay/index.json")
    p.add_argument(
        "--offset",
        type=int,
        default=0,
        help="pair reward update t with policy update t+OFFSET (1: the reward "
        "refinement's effect on the next policy learning); default 0",
    )
    p.add_argument(
        "--methods",
        default="pca,tsne,umap",
        help="comma-separated projection methods out of pca,tsne,umap",
    )
    p.add_argument("--dims", default="2,3", help="embedding dimensions, out of 2,3")
    p.add_argument(
        "--mode",
        choices=("auto", "joint", "separate"),
        default="auto",
        help="embed both models on shared axes (joint) or each alone",
    )
    p.add_argument(
        "--pairing",
        choices=("auto", "iteration", "index"),
        default="auto",
        help="updates per iteration or per snapshot (see analysis docs)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="cap on the reduced dimension of the updates (default: exact)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="update pairs per distance-correlation window (default: cumulative)",
    )
    p.add_argument(
        "--extrapolate",
        type=int,
        default=0,
        help="extend each embedded trajectory by N linearly extrapolated points",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of t-SNE and UMAP")
    p.add_argument("--no-html", action="store_true", help="skip the interactive HTML report")
    return p


def _csv(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(
            f"{what} must be a comma-separated list out of {','.join(allowed)}; got {text!r}"
        )
    return list(dict.fromkeys(items))


def _options(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str], list[int]]:
    """Parsed arguments, projection methods and dimensions; ``ValueError`` when the options
    are bad or the run directory holds no snapshots."""
    args = _parser().parse_args(argv)
    methods = _csv(args.methods, METHODS, "--methods")
    dims = [int(d) for d in _csv(args.dims, ("2", "3"), "--dims")]
    if not (args.run_dir / "interplay" / "index.json").exists():
        raise ValueError(
            f"{args.run_dir} has no interplay snapshots (expected "
            f"{args.run_dir / 'interplay' / 'index.json'}). Enable the interplay snapshot "
            "callback when training, or pass the run directory that contains 'interplay/'."
        )
    return args, methods, dims


def _projections(
    trajectories: Trajectories, args: argparse.Namespace, methods: list[str], dims: list[int]
) -> tuple[list[Projection], list[str]]:
    """Every method x dimension projection, and their fallback notes (not warnings)."""
    projections, notes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fallbacks are recorded as notes
        for method in methods:
            for d in dims:
                proj = project(
                    trajectories,
                    method,
                    d,
                    mode=args.mode,
                    extrapolate=args.extrapolate,
                    seed=args.seed,
                )
                projections.append(proj)
                notes += [f"{method} {d}-D: {note}" for note in proj.notes]
    return projections, notes


def _print_metrics(result: dict[str, Any]) -> None:
    """The summary lines of the metrics: pairs, Procrustes, dCor, Pearson r, mean angle."""
    if "error" in result:
        print(f"  metrics skipped: {result['error']}")
        return

    def fmt(v: float | None, statistic: str = "") -> str:
        return (why_not(result, statistic) or "n/a") if v is None else f"{v:.4f}"

    print(
        f"  {result['n_pairs']} update pairs (pairing {result['pairing']}, offset "
        f"{result['offset']}, {result['space']} space, k={result['k']})"
    )
    if not result["n_pairs"]:
        return
    proc, dc = result["procrustes"], result["distance_correlation"]
    print(
        f"  Procrustes disparity {fmt(proc['disparity'], 'procrustes')} (chance "
        f"{fmt(proc['permutation_mean'])}, p {fmt(proc['p_value'])}); "
        f"distance correlation {fmt(dc['overall'], 'distance_correlation')} "
        f"(p {fmt(dc['p_value'])}); Pearson r of update norms "
        f"{fmt(result['pearson']['update_norms'], 'pearson')}"
    )
    angles = [a for a in result.get("angle_updates_deg", []) if a is not None]
    if angles:
        print(f"  angle between updates: mean {sum(angles) / len(angles):.1f} deg")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the analysis; returns the exit status (0 ok, 2 no snapshots / bad options)."""
    try:
        args, methods, dims = _options(argv)
    except ValueError as err:
        print(f"zopro-viz: {err}", file=sys.stderr)
        return 2

    # Imported here so that `zopro-viz --help` and the error paths stay fast.
    from .analysis import analyse
    from .plots import render
    from .snapshots import load_run

    started = time.perf_counter()
    trajectories = load_run(args.run_dir)
    try:
        result = analyse(
            trajectories, offset=args.offset, k=args.k, window=args.window, pairing=args.pairing
        )
    except ValueError as err:  # e.g. only one model was snapshotted
        result = {"error": str(err)}
    projections, notes = _projections(trajectories, args, methods, dims)
    out_dir = args.run_dir / "plots"
    written = render(
        trajectories,
        projections,
        result if "error" not in result else None,
        out_dir,
        html_report=not args.no_html,
    )
    payload = result | {
        "snapshots": {
            t.model: {"n": t.n, "dim": t.dim, "projected": t.projection is not None}
            for t in trajectories
        },
        "projection_notes": list(dict.fromkeys(notes)),
    }
    json_path = out_dir / "interplay.json"
    json_path.write_text(json.dumps(payload, indent=1))
    written.append(json_path)

    print(f"zopro-viz: {args.run_dir}")
    for t in trajectories:
        print(
            f"  {t.model:7s} {t.n:4d} snapshots x {t.dim} dims"
            + (" (count-sketched)" if t.projection else "")
        )
    _print_metrics(result)
    print(f"  wrote {len(written)} files to {out_dir} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
