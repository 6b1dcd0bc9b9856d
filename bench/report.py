"""Render the benchmark results (``bench/results/*.json``) as Markdown tables, and put them in
the README between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``.

    python bench/report.py            # rewrite the README's section
    python bench/report.py --print    # print the Markdown only

Each table names the JSON it came from, the device and the date; nothing in it is typed by
hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def origin(result: dict, name: str, command: str) -> str:
    when = result["date"][:10]
    device = result.get("device") or result.get("machine", "?")
    return f"`{command}` → `bench/results/{name}.json` ({device}, {when})"


def step_cost_section() -> list[str]:
    lines = []
    for path in sorted(RESULTS.glob("step_cost_*.json")):
        name = path.stem
        result = load(name)
        command = "python bench/step_cost.py" + (
            f" --batch {result['batch_sequences']} --seq {result['sequence_tokens']}"
            if result["batch_sequences"] != 16
            else ""
        )
        if result["repeats"] != 3:
            command += f" --repeats {result['repeats']}"
        lines += [
            f"**SPSA step cost** (`{name}`): "
            + origin(result, name, command)
            + f"; {result['batch_sequences']} sequences × {result['sequence_tokens']} tokens; "
            "ratios to one inference forward of the same batch, measured in one process (median "
            "of the per-repeat ratios; fastest: the fastest repeat over the fastest forward).",
            "",
            "| model | trainable | ZO time / fwd (median; fastest) | FO time / fwd (median; "
            "fastest) | ZO peak / fwd | FO peak / fwd |",
            "|---|---|---|---|---|---|",
        ]

        def times(r: dict, op: str) -> str:
            fastest = r.get(f"{op}_time_over_forward_min")
            median = f"{r[f'{op}_time_over_forward']:.2f}"
            return median if fastest is None else f"{median}; {fastest:.2f}"

        for r in result["ratios"]:
            lines.append(
                f"| {r['size']} ({r['params_total'] / 1e6:.1f} M), {r['mode']} | "
                f"{r['params_trainable']:,} | {times(r, 'zo')} | {times(r, 'fo')} | "
                f"{r['zo_peak_over_forward']:.2f} | {r['fo_peak_over_forward']:.2f} |"
            )
        lines.append("")
    return lines


def convergence_section() -> list[str]:
    result = load("convergence")
    if result is None:
        return []
    s = result["settings"]
    lines = [
        "**Convergence** (embedded task, from the same SFT, reward model and first-order "
        "iteration 0; then each method for the same updates on the same prompts): "
        + origin(result, "convergence", "python bench/convergence.py")
        + f"; seeds {s['seeds']}, ZO lr {s['zo_lr']}, eps {s['eps']}, q {s['q']}, FO lr "
        f"{s['fo_lr']}; gold = VADER on {s['eval_prompts']} held-out prompts × "
        f"{s['eval_samples']} samples.",
        "",
        "![convergence](bench/results/convergence.png)",
        "",
        f"| method | gold gain after {s['steps']} updates (mean; per seed) | "
        "gain at first-order's wall-clock |",
        "|---|---|---|",
    ]
    for method, summary in result["summary"].items():
        per_seed = ", ".join(f"{g:+.3f}" for g in summary["gains"])
        at_time = summary.get("gain_at_first_order_seconds")
        lines.append(
            f"| {method} | {summary['gain_mean']:+.3f} ({per_seed}) | "
            + (f"{at_time:+.3f}" if at_time is not None else "–")
            + " |"
        )
    for key, value in result["ratios"].items():
        lines.append(f"\n{key.replace('_', ' ')}: **{value:.2f}**")
    variants = sorted(RESULTS.glob("convergence_*.json"))
    if variants:
        lines += [
            "",
            "Variants (`python bench/convergence.py --tag TAG ...`; one seed each):",
            "",
            "| tag | overrides | ZO lr | method: gain after the updates |",
            "|---|---|---|---|",
        ]
    for path in variants:
        variant = json.loads(path.read_text())
        gains = ", ".join(
            f"{method} {summary['gain_mean']:+.3f}"
            for method, summary in variant["summary"].items()
        )
        overrides = " ".join(variant["overrides"]) or "–"
        lines.append(
            f"| {path.stem.removeprefix('convergence_')} | `{overrides}` | "
            f"{variant['settings']['zo_lr']} | {gains} |"
        )
    lines.append("")
    return lines


def peer_section() -> list[str]:
    result = load("peer_trl")
    if result is None:
        return []
    lines = [
        f"**Peer: TRL {result['trl']} `RLOOTrainer`** on the same work ("
        f"{result['prompts_per_update']} prompts × {result['completions_per_prompt']} "
        f"completions per update): " + origin(result, "peer_trl", "python bench/peer_trl.py") + ".",
        "",
        "| setting | runner | s / update | peak RSS (MB) | training's own peak (MB) | "
        "gold after (mean ± sd) |",
        "|---|---|---|---|---|---|",
    ]
    for setting, s in result["summary"].items():
        for runner in ("trl", "ours_first_order", "ours_zeroth_order"):
            gold = s.get(f"{runner}_gold_after_mean")
            gold_text = f"{gold:.3f} ± {s[f'{runner}_gold_after_sd']:.3f}" if gold else "–"
            lines.append(
                f"| {setting} | {runner} | {s[f'{runner}_seconds_per_update']:.3f} | "
                f"{s[f'{runner}_peak_mb']:.0f} | {s[f'{runner}_peak_above_baseline_mb']:.0f} | "
                f"{gold_text} |"
            )
    lines.append("")
    for setting, s in result["summary"].items():
        lines.append(
            f"- {setting}: our first-order time / TRL's = "
            f"**{s['ours_first_order_time_over_trl']:.2f}**; our zeroth-order peak / TRL's = "
            f"**{s['ours_zeroth_order_peak_over_trl']:.2f}** (training's own: "
            f"{s['ours_zeroth_order_peak_above_baseline_over_trl']:.2f})"
        )
    lines.append("")
    return lines


def communication_section() -> list[str]:
    result = load("communication")
    if result is None:
        return []
    lines = [
        f"**Communication under {result['world_size']}-process DDP** ({result['backend']}, "
        "bytes each rank hands to the all-reduces per policy update): "
        + origin(result, "communication", "python bench/communication.py"),
        "",
        "| model | trainable | zeroth-order B / update | first-order B / update | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        lines.append(
            f"| {r['size']}, {r['mode']} | {r['params_trainable']:,} | "
            f"{r['zeroth_order_bytes_per_update']:.0f} | {r['first_order_bytes_per_update']:,.0f} "
            f"| {r['first_over_zeroth']:,.0f} |"
        )
    lines.append("")
    return lines


def render() -> str:
    lines = [
        "### Benchmarks",
        "",
        "Generated by `python bench/report.py` from `bench/results/`.",
        "",
    ]
    for section in (convergence_section, peer_section, step_cost_section, communication_section):
        lines += section()
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print, do not touch the README")
    args = parser.parse_args(argv)
    markdown = render()
    if args.print:
        print(markdown)
        return
    text = README.read_text()
    block = f"{BEGIN}\n{markdown}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
