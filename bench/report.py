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
        command = result.get("command")
        if command is None:  # files written before the command was recorded
            command = "python bench/step_cost.py" + (
                f" --batch {result['batch_sequences']} --seq {result['sequence_tokens']}"
                if result["batch_sequences"] != 16
                else ""
            )
            if result["repeats"] != 3:
                command += f" --repeats {result['repeats']}"
        has_adam = any("zo_adam_time_over_forward" in r for r in result["ratios"])
        lines += [
            f"**SPSA step cost** (`{name}`): "
            + origin(result, name, command)
            + f"; {result['batch_sequences']} sequences × {result['sequence_tokens']} tokens; "
            "ratios to one inference forward of the same batch, measured in one process (median "
            "of the per-repeat ratios; fastest: the fastest repeat over the fastest forward).",
            "",
            "| model | trainable | ZO time / fwd (median; fastest) | "
            + ("ZO-Adam time / fwd (median; fastest) | " if has_adam else "")
            + "FO time / fwd (median; fastest) | ZO peak / fwd | "
            + ("ZO-Adam peak / fwd | " if has_adam else "")
            + "FO peak / fwd |",
            "|---|---|---|---|---|---|" + ("---|---|" if has_adam else ""),
        ]

        def times(r: dict, op: str) -> str:
            if f"{op}_time_over_forward" not in r:
                return "–"
            fastest = r.get(f"{op}_time_over_forward_min")
            median = f"{r[f'{op}_time_over_forward']:.2f}"
            return median if fastest is None else f"{median}; {fastest:.2f}"

        def peak(r: dict, op: str) -> str:
            value = r.get(f"{op}_peak_over_forward")
            return "–" if value is None else f"{value:.2f}"

        for r in result["ratios"]:
            ops = ("zo", "zo_adam", "fo") if has_adam else ("zo", "fo")
            lines.append(
                f"| {r['size']} ({r['params_total'] / 1e6:.1f} M), {r['mode']} | "
                f"{r['params_trainable']:,} | "
                + " | ".join(times(r, op) for op in ops)
                + " | "
                + " | ".join(peak(r, op) for op in ops)
                + " |"
            )
        lines.append("")
        lines += memory_section(result, name)
    return lines


OPERATION_NAMES = {
    "forward": "forward",
    "zeroth_order": "ZO-SGD",
    "zeroth_order_adam": "ZO-Adam",
    "first_order": "AdamW",
}


def memory_section(result: dict, name: str) -> list[str]:
    """Bytes per model and per trainable parameter (measured) and the largest model per mode
    on one GPU (extrapolated), from the ``memory`` and ``memory_model`` blocks."""
    memory, model = result.get("memory"), result.get("memory_model")
    if not memory or not model:
        return []
    return (
        measured_memory_lines(result, name, memory)
        + memory_model_lines(result, model)
        + [
            "",
            "The 80 GB extrapolation of this fitted model (its `gpu` block, which assumed a "
            "bf16 weight copy for the exact restore and a deep-copied reference) is superseded "
            "by the one from measured sizes in **Largest model per mode** above.",
            "",
        ]
    )


def measured_memory_lines(result: dict, name: str, memory: list[dict]) -> list[str]:
    """The measured table: bytes per model parameter of each operation, per size and mode."""
    ops = [op for op in OPERATION_NAMES if any(m["operation"] == op for m in memory)]
    lines = [
        f"**Memory per parameter** (`{name}`, measured): peak resident memory above the process "
        "before the model was built (weights, state, activations; float32) ÷ model parameters "
        "P; in brackets what the operation adds to an inference forward ÷ trainable parameters "
        f"P_t; {result['batch_sequences']} × {result['sequence_tokens']} tokens.",
        "",
        "| model | P | P_t | " + " | ".join(f"{OPERATION_NAMES[op]} B / P" for op in ops) + " |",
        "|---|---|---|" + "---|" * len(ops),
    ]
    keys = []
    for m in memory:
        if (m["size"], m["mode"]) not in keys:
            keys.append((m["size"], m["mode"]))
    for size, mode in keys:
        by_op = {m["operation"]: m for m in memory if (m["size"], m["mode"]) == (size, mode)}
        first = next(iter(by_op.values()))
        cells = [memory_cell(op, by_op.get(op)) for op in ops]
        lines.append(
            f"| {size}, {mode} | {first['params_total'] / 1e6:.1f} M | "
            f"{first['params_trainable']:,} | " + " | ".join(cells) + " |"
        )
    return lines


def memory_cell(op: str, m: dict | None) -> str:
    if m is None:
        return "–"
    if op == "forward":
        return f"{m['bytes_per_param']:.1f}"
    extra = m["extra_over_forward_bytes_per_trainable"]
    return f"{m['bytes_per_param']:.1f} (+{max(extra, 0):.1f})"


def memory_model_lines(result: dict, model: dict) -> list[str]:
    """The fitted memory model, its worst error and ZO-Adam's predicted (unfitted) errors."""
    groups = model["coefficients"]
    checks = [p for p in model["points"] if not p["in_fit"]]
    worst_fit = max(abs(p["relative_error"]) for p in model["points"] if p["in_fit"])
    return [
        "",
        "Memory model (`bench/memory_model.py`"
        + (
            f", re-derived by `{result['memory_model_rederived']['command']}`"
            if "memory_model_rederived" in result
            else ""
        )
        + "): peak = w·P + s·P_t + max(activations, update "
        "transients), w and s counted from the code (float32 here: AdamW s = 4 B gradient + "
        "8 B moments; ZO-SGD s = 0 full-parameter, 4 B copy with LoRA; ZO-Adam + 8 B moments), "
        "activations fitted by non-negative least squares: "
        + "; ".join(
            f"{group} {g['alpha_bytes_per_unit']:.1f} B per "
            f"{g['activation_unit'].replace('*', '·')} + "
            f"{g['beta_bytes_per_logit']:.2f} B per logit"
            for group, g in groups.items()
        )
        + f". Worst error on the fitted points {worst_fit:.1%}; ZO-Adam, predicted without "
        "fitting: "
        + ", ".join(f"{p['size']} {p['mode']} {p['relative_error']:+.1%}" for p in checks)
        + ".",
    ]


LARGEST_MODE_NAMES = {
    "zo_full": "full-parameter ZO-SGD, bf16, β > 0 reference",
    "adamw_full": "full-parameter AdamW, fp32 master + bf16 autocast, checkpointing",
    "zo_lora": "LoRA r=8 ZO-SGD, bf16 base",
    "adamw_lora": "LoRA r=8 AdamW, bf16 base, checkpointing",
}


def largest_model_section() -> list[str]:
    """The sizes ``bench/largest_model.py`` ran per mode (measured) and the 80 GB
    extrapolation of ``bench/gpu_extrapolation.py`` from them."""
    result = load("largest_model")
    if result is None:
        return []
    s = result["settings"]
    commands = "`, `".join(result.get("commands", [result.get("command", "")]))
    lines = [
        f"**Largest model per mode** (measured): `{commands}` → "
        f"`bench/results/largest_model.json` ({result['device']}, {result['date'][:10]}). "
        f"Random Llamas (head size 128, untied, vocab 32,004), {s['updates']} real ZOPrOModule "
        f"updates per size ({s['prompts']} prompts × k={s['k']}, {s['prompt_tokens']} prompt "
        f"+ {s['new_tokens']} new tokens: rollout with generation, reference, update) in a "
        "fresh process each. Peak = RssAnon + RssShmem sampled every 10 ms; pages of "
        "memory-mapped files (RssFile: the reference streamed from disk) are page cache and "
        f"are not counted. A child over {result['cap_gb']:g} GB (or MemAvailable − 1 GB) is "
        "killed: that size does not fit.",
        "",
        "| mode | size | parameters | update peak | inference-forward peak | update / forward "
        "| B / parameter | fits | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = LARGEST_MODE_NAMES.get(r["mode"], r["mode"])
        if not r["fit"]:
            lines.append(
                f"| {name} | {r['size']} | {r['params_total'] / 1e9:.2f} B | – | – | – | – | "
                f"{verdict(r)}: {r['why']} | {r['seconds']:.0f} |"
            )
            continue
        lines.append(
            f"| {name} | {r['size']} | {r['params_total'] / 1e9:.2f} B | "
            f"{r['update_peak_mb'] / 1024:.2f} GiB | {r['forward_peak_mb'] / 1024:.2f} GiB | "
            f"{r['update_over_forward']:.2f} | {r['bytes_per_param']:.2f} | yes | "
            f"{r['seconds']:.0f} |"
        )
    return lines + [""] + extrapolation_lines()


def verdict(row: dict) -> str:
    """``no`` for a size that does not fit; a run the time limit stopped, or a size skipped on
    its estimate, is not a verdict."""
    if row.get("outcome") == "time_limit" or row["why"].startswith("over the time limit"):
        return "not finished (says nothing of memory)"
    if row["why"].startswith("not tried"):
        return "not run (estimate over the cap)"
    return "no"


def extrapolation_lines() -> list[str]:
    """The redone 80 GB table of ``bench/gpu_extrapolation.py``."""
    result = load("gpu_extrapolation")
    if result is None:
        return []
    usable = (result["budget_bytes"] - result["reserve_bytes"]) / 1e9
    lines = [
        f"**Largest model on one {result['budget_bytes'] / 1e9:.0f} GB device**, extrapolated "
        f"from the measured sizes: `{result['command']}` → `bench/results/"
        f"gpu_extrapolation.json`. {result['how']} {usable:.0f} GB usable.",
        "",
        "| mode | B / parameter (fitted slope) | intercept (CPU process) | fitted on | worst "
        "residual | largest model on the device |",
        "|---|---|---|---|---|---|",
    ]
    for mode, fit in result["fit"].items():
        device = result["device"][mode]
        lines.append(
            f"| {LARGEST_MODE_NAMES.get(mode, mode)} | {fit['bytes_per_param']:.2f} | "
            f"{fit['intercept_gb']:.2f} GB | {', '.join(fit['sizes'])} | "
            f"{fit['max_relative_residual']:.1%} | **{device['params'] / 1e9:.1f} B** |"
        )
    ratio = result.get("zo_full_over_adamw_full")
    if ratio:
        lines += ["", f"- full-parameter ZO over full-parameter AdamW on the device: {ratio:.1f} ×"]
    return lines + [""]


def schedules_section() -> list[str]:
    """The paper's comparison (``bench/schedules.py``): gains per method, mean ± s.e. over the
    reported seeds, the paired differences and the targets' ratios."""
    result = load("schedules")
    if result is None:
        return []
    env = result["environment"]
    methods, paired = result["methods"], result["paired"]
    lines = [
        "**Schedules** (the paper's comparison on the embedded task, through `zopro-train`'s "
        "pipeline with refinement; every method of a seed shares SFT and r_0, and the "
        "first-order-then-ZO methods share iteration 0): `python bench/schedules.py` → "
        f"`bench/results/schedules.json` ({env['device']}, {env['date'][:10]}); seeds "
        f"{result['seeds']} (never used to tune). Gains are held-out gold reward differences; "
        "± is the standard error over seeds.",
        "",
        *([f"Note: {result['note']}", ""] if result.get("note") else []),
        "![schedules](bench/results/schedules.png)",
        "",
        "| method | overrides | gain of iterations 1..T | gain from SFT | policy seconds 1..T |",
        "|---|---|---|---|---|",
    ]
    for method, row in methods.items():
        g, w = row["gain_iterations_1_to_T"], row["gain_from_sft"]
        overrides = " ".join(result["overrides"].get(method, []))
        lines.append(
            f"| {method} | `{overrides}` | {g['mean']:+.4f} ± {g['se']:.4f} | "
            f"{w['mean']:+.4f} ± {w['se']:.4f} | {row['policy_seconds_iterations_1_to_T']:.1f} |"
        )
    lines.append("")
    for key, row in paired.items():
        ratio = f", ratio of means {row['ratio']:.2f}" if row.get("ratio") is not None else ""
        lines.append(
            f"- {key.replace('_', ' ')}: {row['mean']:+.4f} ± {row['se']:.4f} (paired over "
            f"seeds{ratio})"
        )
    for key, value in result.get("targets", {}).items():
        lines.append(f"- {key.replace('_', ' ')}: **{value}**")
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
    sections = (
        schedules_section,
        peer_section,
        largest_model_section,
        step_cost_section,
        communication_section,
    )
    for section in sections:
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
