"""What ``zopro-train`` keeps off the console: each line once, and no known harmless message.

Applied by the entry point only (:func:`quiet_console`); a library user's own logging and
warnings are left alone.

- **Each Lightning line once.** The ``lightning`` package logger has a stderr handler of its
  own and also propagates to the root logger, which Hydra configured (console and
  ``RUN_DIR/<job>.log``): every Lightning INFO line came twice. When the root logger has
  handlers, Lightning's loggers drop their own and go through the root's (Hydra's format, the
  job log). A run builds one ``Trainer`` a phase, and each repeats its device lines and the
  like; a Lightning line is shown the first time it appears in a run.
- **Known harmless messages**, each matched by its own text where it arises (the table
  :data:`HARMLESS_WARNINGS`, the litlogger tip, transformers' load report of a fresh reward
  head). Every other warning still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")

# (category, start of the message, where it comes from and why it is harmless here)
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (
        UserWarning,  # lightning's PossibleUserWarning
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "lightning/pytorch/loops/fit_loop.py: the networks train in eval mode on purpose "
        "(no dropout between SPSA's two forwards or in rollouts)",
    ),
    (
        UserWarning,  # lightning's PossibleUserWarning
        r"You defined a `validation_step` but have no `val_dataloader`",
        "lightning/pytorch/trainer/configuration_validator.py: the pipeline measures the "
        "reward model on held-out data itself",
    ),
    (
        UserWarning,
        r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
        r"pre-optimization state was saved",
        "lightning/pytorch/callbacks/model_checkpoint.py (2.6) warns, with a code sample, at "
        "every save of a manual-optimisation module that lacks the `saved_models` and `layer` "
        "attributes of Lightning's own test module; ZOPrOModule's checkpoints are meant to hold "
        "the state after the update (with the rollouts still accumulating), so nothing is lost",
    ),
    (
        UserWarning,
        r"Metric `SpearmanCorrcoef` will save all targets and predictions",
        "torchmetrics/regression/spearman.py: the held-out sets are small",
    ),
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        "transformers/modeling_utils.py, read by peft/peft_model.py when it wraps a model",
    ),
    (
        FutureWarning,
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "torch/utils/_pytree.py, through lightning/pytorch/utilities/_pytree.py",
    ),
)

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"  # lightning's logger_connector.py, per Trainer
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LightningLinesOnce(logging.Filter):
    """Passes every record except a Lightning line already passed, or the litlogger tip."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("lightning"):
            return True
        message = record.getMessage()
        if message.startswith(LITLOGGER_TIP) or message in self.seen:
            return False
        self.seen.add(message)
        return True


class FreshRewardHeadReport(logging.Filter):
    """Drops transformers' load report when all it reports is a missing ``score`` head: a
    reward model built from a causal LM (``load_sequence_classifier``) gets a fresh one by
    design. Any other missing, unexpected or mismatched key is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = ANSI.sub("", record.getMessage())
        if "ForSequenceClassification LOAD REPORT" not in message:
            return True
        rows = [
            [cell.strip() for cell in line.split("|")]
            for line in message.splitlines()
            if " | " in line and not line.startswith("Key ")
        ]
        fresh_head = all(row[0].startswith("score.") and row[1] == "MISSING" for row in rows)
        return not (rows and fresh_head)


def add_filter_once(target: logging.Logger | logging.Handler, kind: type[logging.Filter]) -> None:
    if not any(isinstance(existing, kind) for existing in target.filters):
        target.addFilter(kind())


def quiet_console() -> None:
    """Each console line once and the known harmless messages silenced (see the module)."""
    import lightning  # noqa: F401  (its loggers get their own handler on import)

    for category, message, _where in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    add_filter_once(logging.getLogger("transformers.modeling_utils"), FreshRewardHeadReport)
    root = logging.getLogger()
    if not root.handlers:  # logging configured off (hydra/job_logging=none): Lightning's own
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for handler in root.handlers:
        add_filter_once(handler, LightningLinesOnce)
