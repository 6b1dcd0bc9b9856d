"""A quiet, informative console: `zopro-train --help`, each line of a run once, and the known
harmless messages silenced (zopro_lightning/run/console.py, conf/hydra/help/zopro.yaml)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections import Counter

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.test_cli import zopro_train
from zopro_lightning.run.cli import CONFIG_DIR
from zopro_lightning.run.console import FreshRewardHeadReport, LightningLinesOnce

HYDRA_PREFIX = re.compile(r"^\[[^\]]+\]\[[^\]]+\]\[[A-Z]+\] - ")


def record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)


def load_report(*rows: tuple[str, str]) -> str:
    """transformers' load report (utils/loading_report.py) as it is logged, colours and all."""
    bold, red, reset = "\x1b[1m", "\x1b[31m", "\x1b[0m"
    table = ["Key          | Status  | ", "-------------+---------+-"]
    table += [f"{key} | {red}{status}{reset} | " for key, status in rows]
    return (
        f"{bold}LlamaForSequenceClassification LOAD REPORT{reset} from: /run/sft\n"
        + "\n".join(table)
        + "\n\nNotes:\n- MISSING:\tthose params were newly initialized"
    )


def test_the_fresh_reward_head_report_is_dropped_and_any_other_kept():
    keep = FreshRewardHeadReport().filter
    name = "transformers.modeling_utils"
    assert not keep(record(name, load_report(("score.weight", "MISSING"))))
    assert keep(record(name, load_report(("score.weight", "MISSING"), ("model.norm", "MISSING"))))
    assert keep(record(name, load_report(("score.weight", "UNEXPECTED"))))
    assert keep(record(name, "some other warning"))


def test_lightning_lines_pass_once_and_others_always():
    keep = LightningLinesOnce().filter
    device = "lightning.pytorch.utilities.rank_zero"
    assert keep(record(device, "GPU available: False, used: False"))
    assert not keep(record(device, "GPU available: False, used: False"))
    assert keep(record(device, "TPU available: False, using: 0 TPU cores"))
    assert not keep(record(device, "💡 Tip: For seamless cloud logging and experiment tracking"))
    ours = "zopro_lightning.run.pipeline"
    assert keep(record(ours, "iteration 0")) and keep(record(ours, "iteration 0"))


def help_text() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "zopro_lightning.run.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_help_lists_the_config_groups_and_the_main_options():
    text = help_text()
    groups = text.split("== Config groups (group=option) ==")[1].split("== Main options")[0]
    for group in ("sampler", "model", "dataset", "judge", "trainer", "logger", "experiment"):
        assert re.search(rf"^{group}: \w", groups, re.M), group
    assert "sampler: gaussian, rademacher, subspace, zopro" in groups
    assert "trainer: cpu, ddp, fsdp, gpu" in groups
    options = text.split("== Main options")[1].split("\n\n")[0].splitlines()[1:]
    keys = [line.split()[0] for line in options]
    for key in ("seed", "resume", "loop.iterations", "loop.zeroth_order_lr", "policy.rollout.k"):
        assert key in keys, key
    assert len(keys) == len(set(keys))
    # every option listed exists in the composed config, and its line shows its value
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    missing = object()
    for key, line in zip(keys, options, strict=True):
        value = OmegaConf.select(cfg, key, default=missing)
        assert value is not missing, f"--help lists {key}, which conf/config.yaml does not have"
        if key != "hydra.run.dir":
            assert line.endswith(f"[{value}]"), line


#: a tqdm bar's text up to its rate (``... 3/4 [00:01<00:00, 2.5it/s, reward=0.1]``): what a
#: terminal redraws in place; a log line written right after a bar's last redraw is kept
BAR = re.compile(r"^.*(?:it/s|s/it|\|\s+\| \d+/\?)[^\]]*\]\s*")


def console_lines(output: str) -> list[str]:
    """The lines a terminal keeps: progress bars (tqdm redraws with carriage returns) and
    blank lines dropped, Hydra's log prefix removed."""
    lines = []
    for line in output.splitlines():  # (splits at "\r" too: each redraw of a bar)
        line = BAR.sub("", line)
        if not line.strip() or "━" in line:
            continue
        lines.append(HYDRA_PREFIX.sub("", line).removeprefix("INFO: "))
    return lines


def test_console_lines_drop_bars_and_keep_log_lines_written_after_them():
    output = (
        "[sft]:   0%|          | 0/1 [00:00<?, ?it/s]\r"
        "[sft]: 100%|##########| 1/1 [00:00<00:00, 18.6it/s, sft/loss=5.460]"
        "[2026-11-30 13:38:56,600][lightning][INFO] - `Trainer.fit` stopped.\n"
        "Training: |          | 0/? [00:00<?, ?it/s]\n"
        "evaluation:   0%|          | 0/4 [00:00<?, ?it/s]\r                 \n"
        "[2026-11-30 13:38:56,765][zopro_lightning.run.pipeline][INFO] - [iteration 1/4] x\n"
    )
    assert console_lines(output) == ["`Trainer.fit` stopped.", "[iteration 1/4] x"]


@pytest.mark.slow
def test_a_run_prints_each_line_once_and_no_harmless_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # progress bars on one line each
    iterations = OmegaConf.load(f"{CONFIG_DIR}/config.yaml").loop.iterations  # the default T
    # checkpoints inside every policy phase, as loop.checkpoint_every makes in a default run
    inside = "loop.checkpoint_every=1"
    result = zopro_train(tmp_path / "run", f"loop.iterations={iterations}", inside)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    lines = console_lines(output)
    repeated = [line for line, count in Counter(lines).items() if count > 1]
    assert not repeated, "\n".join(repeated)
    assert len(lines) <= 60, "\n".join(lines)  # besides progress bars
    # every phase has a bar that says where the run is, not "Epoch 0/-2"
    for bar in ("[sft]", "[reward model r_0]", f"[iteration {iterations}/{iterations}] policy",
                f"[iteration 1/{iterations}] refinement", "evaluation", "fresh completions",
                "judging"):  # fmt: skip
        assert f"{bar}" in output, bar
    # and only those: no frame of Lightning's own "Training" or "Epoch 0" bar before them
    for lightning_bar in ("Training: ", "Epoch 0"):
        assert lightning_bar not in output, lightning_bar
    for harmless in (
        "litlogger",
        "in eval mode",
        "LOAD REPORT",
        "will save all targets and predictions",
        "is_gradient_checkpointing",
        "LeafSpec",
        "validation_step",
        "pre-optimization state",  # ModelCheckpoint under manual optimisation, with its sample
        "saved_models",
    ):
        assert harmless not in output, harmless
    # still informative: where it ran, what it did, what it wrote
    assert lines.count("GPU available: False, used: False") == 1
    assert any(line.startswith("iteration 1:") for line in lines)
    assert "gold_reward_final" in result.stdout
    # and the run's log file holds Lightning's lines too (they go through Hydra's handlers)
    log = (tmp_path / "run" / "cli.log").read_text()
    assert "GPU available" in log


def test_console_filters_are_left_out_of_library_use():
    """Importing the package changes no logging or warning state; only zopro-train does."""
    code = (
        "import logging, warnings, lightning, zopro_lightning.run.cli;"
        "ours = [f for f in warnings.filters if f[1] and 'eval mode' in f[1].pattern];"
        "print(bool(logging.getLogger('lightning').handlers), not ours)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.split() == ["True", "True"], result.stderr[-2000:]
