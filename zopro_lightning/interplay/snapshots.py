"""Snapshot format of the interplay analysis: writer and loaders.

Layout under a run directory ``RUN_DIR``::

    RUN_DIR/interplay/index.json                 list of records, in save order
    RUN_DIR/interplay/<model>_<seq:05d>.safetensors

Each index record is ``{"file": "policy_00003.safetensors", "model": "policy" | "reward",
"step": int, "iteration": int, "phase": str, "fraction": float}``; ``seq`` counts the
snapshots of that model from 0. ``step`` is the global (policy-update) step, ``iteration``
the policy-learning / reward-refinement iteration t of docs/algorithm.md §2, ``phase`` a free
label (e.g. ``"init"``, ``"policy"``, ``"reward"``), ``fraction`` the fraction of training done.

A snapshot file holds the model's trainable tensors (for LoRA: the A/B matrices) as float32
on CPU, keyed by canonical parameter name (adapter names stripped, e.g.
``model.layers.0.self_attn.q_proj.lora_A.weight``), so that policy and reward tensors of
the same layout share names. When their total size D exceeds ``max_numel`` the file
instead holds one float32 vector of length ``max_numel`` under the key ``__projection__``:
the count sketch of :mod:`.sketch` (seeded, identical for every snapshot), with the
safetensors metadata ``{"projection": SKETCH_KIND, "seed", "dim", "source_numel"}``.

Writes are atomic: a file is written under a temporary name in the same folder and moved
into place with :func:`os.replace`, the file before the index that names it, so a reader
never sees a half-written file nor an index record without its file. Only one process
(rank 0) should write a run's snapshots.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from zopro_lightning.utils.atomic import atomic_write

from .sketch import SKETCH_KIND, count_sketch
from .trajectory import MODELS, Trajectories, Trajectory

INDEX = "index.json"
SUBDIR = "interplay"
PROJECTION_KEY = "__projection__"
ADAPTER_FILE = "adapter_model.safetensors"
_FILE_RE = re.compile(r"^(policy|reward)_(\d{5,})\.safetensors$")


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device or float dtype) or an array, as a contiguous float32 array."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


class SnapshotWriter:
    """Writes snapshots of the policy and the reward model under ``root/interplay/``.

    ``root`` is the run directory. An existing index there is read and extended (resumed
    runs keep one trajectory). ``max_numel=None`` never projects.
    """

    def __init__(
        self, root: Path | str, max_numel: int | None = 2_000_000, projection_seed: int = 0
    ) -> None:
        if max_numel is not None and max_numel < 1:
            raise ValueError(f"max_numel must be >= 1 or None, got {max_numel}")
        self.root = Path(root)
        self.directory = self.root / SUBDIR
        self.max_numel = max_numel
        self.projection_seed = int(projection_seed)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = (
            _read_index(self.directory) if (self.directory / INDEX).exists() else []
        )
        self._next_seq = {m: 0 for m in MODELS}
        for rec in self.records:
            match = _FILE_RE.match(rec["file"])
            if match:
                model, seq = match.group(1), int(match.group(2))
                self._next_seq[model] = max(self._next_seq[model], seq + 1)

    def save(
        self,
        model: str,
        tensors: Mapping[str, Any],
        *,
        step: int,
        iteration: int,
        phase: str,
        fraction: float,
    ) -> Path:
        """Write one snapshot of ``model`` and append it to the index; returns the file path.

        ``tensors`` maps canonical parameter names to tensors (torch or numpy, any float
        dtype or device); they are copied to CPU float32.
        """
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if not tensors:
            raise ValueError(f"no tensors given for the {model} snapshot")
        bad = [k for k in tensors if k.startswith("__")]
        if bad:
            raise ValueError(f"tensor names starting with '__' are reserved: {bad[:3]}")
        if not math.isfinite(float(fraction)):
            raise ValueError(f"fraction must be finite, got {fraction}")
        arrays = {name: _to_numpy(t) for name, t in tensors.items()}
        numel = sum(a.size for a in arrays.values())
        metadata = {"model": model, "source_numel": str(numel)}
        if self.max_numel is not None and numel > self.max_numel:
            payload = {PROJECTION_KEY: count_sketch(arrays, self.max_numel, self.projection_seed)}
            metadata |= {
                "projection": SKETCH_KIND,
                "seed": str(self.projection_seed),
                "dim": str(self.max_numel),
            }
        else:
            payload = arrays
        seq = self._next_seq[model]
        path = self.directory / f"{model}_{seq:05d}.safetensors"
        atomic_write(path, lambda tmp: save_file(payload, str(tmp), metadata=metadata))
        self._next_seq[model] = seq + 1
        self.records.append(
            {
                "file": path.name,
                "model": model,
                "step": int(step),
                "iteration": int(iteration),
                "phase": str(phase),
                "fraction": float(fraction),
            }
        )
        text = json.dumps(self.records, indent=1)
        atomic_write(self.directory / INDEX, lambda tmp: tmp.write_text(text))
        return path


def _read_index(directory: Path) -> list[dict[str, Any]]:
    path = directory / INDEX
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); was the run interrupted?") from err
    required = {"file", "model", "step", "iteration", "phase", "fraction"}
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a list of snapshot records")
    for i, rec in enumerate(records):
        missing = required - set(rec) if isinstance(rec, dict) else required
        if missing:
            raise ValueError(f"{path}: record {i} lacks {sorted(missing)}")
    return records


def _read_snapshot(
    path: Path,
) -> tuple[np.ndarray, list[str], list[tuple[int, ...]], dict[str, str]]:
    """One snapshot as (flat float32 vector, names, shapes, metadata)."""
    with safe_open(str(path), framework="numpy") as fh:
        metadata = dict(fh.metadata() or {})
        names = sorted(fh.keys())
        if PROJECTION_KEY in names:
            return fh.get_tensor(PROJECTION_KEY).astype(np.float32).ravel(), [], [], metadata
        arrays = [fh.get_tensor(n) for n in names]
    vector = (
        np.concatenate([a.astype(np.float32).ravel() for a in arrays])
        if arrays
        else np.zeros(0, np.float32)
    )
    return vector, names, [tuple(a.shape) for a in arrays], metadata


def _projection_of(meta: Mapping[str, str]) -> dict[str, str | None] | None:
    """The sketch settings in a snapshot's metadata, ``None`` for a raw snapshot."""
    if "projection" not in meta:
        return None
    return {k: meta.get(k) for k in ("projection", "seed", "dim")}


def _load_model(directory: Path, model: str, recs: list[dict[str, Any]]) -> Trajectory:
    """The trajectory of one model from its index records (at least one), in save order.

    ``FileNotFoundError`` for a file the index names but that is missing, ``ValueError`` when
    a snapshot's tensors or projection differ from the model's first snapshot.
    """
    rows, layout, projection = [], None, None
    for rec in recs:
        path = directory / rec["file"]
        if not path.exists():
            raise FileNotFoundError(f"{directory / INDEX} names {rec['file']}, which is missing")
        vector, names, shapes, meta = _read_snapshot(path)
        this_proj = _projection_of(meta)
        if layout is None:
            layout, projection = (names, shapes), this_proj
        elif (names, shapes) != layout or this_proj != projection:
            raise ValueError(
                f"{path}: tensors or projection differ from the first "
                f"{model} snapshot ({recs[0]['file']}); a trajectory "
                "needs the same trainable set throughout"
            )
        rows.append(vector)
    assert layout is not None
    proj = (
        None
        if projection is None
        else {
            "kind": projection["projection"],
            "seed": int(projection["seed"] or 0),
            "dim": int(projection["dim"] or 0),
        }
    )
    return Trajectory(
        model=model,
        points=np.stack(rows).astype(np.float32, copy=False),
        steps=np.array([int(r["step"]) for r in recs], dtype=np.int64),
        iterations=np.array([int(r["iteration"]) for r in recs], dtype=np.int64),
        phases=tuple(str(r["phase"]) for r in recs),
        fractions=np.array([float(r["fraction"]) for r in recs], dtype=np.float64),
        files=tuple(r["file"] for r in recs),
        names=tuple(layout[0]),
        shapes=tuple(layout[1]),
        projection=proj,
    )


def load_run(run_dir: Path | str) -> Trajectories:
    """Read ``run_dir/interplay/index.json`` and every snapshot it names.

    Returns one :class:`Trajectory` per model present, rows in save order. Raises
    ``FileNotFoundError`` when there is no index, ``ValueError`` when the snapshots of a
    model do not have the same tensors (or the same projection) throughout.
    """
    directory = Path(run_dir) / SUBDIR
    if not (directory / INDEX).exists():
        raise FileNotFoundError(
            f"no interplay snapshots: {directory / INDEX} does not exist. Train with the "
            "interplay snapshot callback enabled, or pass the run directory that holds "
            f"'{SUBDIR}/'."
        )
    records = _read_index(directory)
    models = {
        model: _load_model(directory, model, recs)
        for model in MODELS
        if (recs := [r for r in records if r["model"] == model])
    }
    if not models:
        raise ValueError(f"{directory / INDEX} lists no policy or reward snapshots")
    return Trajectories(models, run_dir=str(run_dir))


def load_peft_adapters(dirs: Sequence[Path | str]) -> np.ndarray:
    """Flattened adapters of PEFT folders as a float32 matrix ``[len(dirs), D]``.

    Reads ``<dir>/adapter_model.safetensors`` (or the path itself when it is a file), and
    concatenates its tensors in sorted key order. All adapters must have the same keys
    and shapes.
    """
    rows, layout = [], None
    for d in dirs:
        path = Path(d)
        path = path if path.is_file() else path / ADAPTER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (expected a PEFT adapter folder)")
        vector, names, shapes, _ = _read_snapshot(path)
        if layout is None:
            layout = (names, shapes)
        elif layout != (names, shapes):
            raise ValueError(f"{path}: keys or shapes differ from the first adapter")
        rows.append(vector)
    if not rows:
        raise ValueError("no adapter folders given")
    return np.stack(rows)
