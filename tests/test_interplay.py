"""Tests of the interplay analysis: snapshot format, metrics with known answers, plots, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from zopro_lightning.interplay import (
    SnapshotWriter,
    Trajectories,
    Trajectory,
    analyse,
    load_peft_adapters,
    load_run,
)
from zopro_lightning.interplay import snapshots as snapshots_mod
from zopro_lightning.interplay.cli import main
from zopro_lightning.interplay.pairing import pair_updates, update_keypoints
from zopro_lightning.interplay.projections import embed, extrapolate_linear, project
from zopro_lightning.interplay.significance import procrustes_test
from zopro_lightning.interplay.sketch import count_sketch
from zopro_lightning.interplay.statistics import (
    angle_deg,
    coordinate_pearson,
    distance_correlation,
    pearson,
)
from zopro_lightning.interplay.trajectory import common_space
from zopro_lightning.interplay.undefined import MIN_PAIRS


def random_walk(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.cumsum(np.random.default_rng(seed).normal(size=(n, d)), axis=0)


def lora_tensors(rng: torch.Generator, score_head: bool = False) -> dict[str, torch.Tensor]:
    out = {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.randn(
            (4, 16) if ab == "A" else (16, 4), generator=rng
        )
        for i in range(2)
        for ab in "AB"
    }
    if score_head:
        out["score.weight"] = torch.randn(1, 16, generator=rng)
    return out


def write_run(
    run: Path, iterations: int = 6, per_iteration: int = 2, max_numel: int | None = None
) -> None:
    """A small synthetic run: policy moves along the reward's previous update plus noise."""
    g = torch.Generator().manual_seed(0)
    pol, rew = lora_tensors(g), lora_tensors(g, score_head=True)
    writer = SnapshotWriter(run, max_numel=max_numel)
    writer.save("policy", pol, step=0, iteration=0, phase="init", fraction=0.0)
    writer.save("reward", rew, step=0, iteration=0, phase="init", fraction=0.0)
    prev = {k: torch.zeros_like(v) for k, v in rew.items()}
    step = 0
    for it in range(iterations):
        for j in range(per_iteration):
            for k in pol:
                pol[k] += prev[k] / per_iteration + 0.05 * torch.randn(pol[k].shape, generator=g)
            step += 1
            writer.save(
                "policy",
                pol,
                step=step,
                iteration=it,
                phase="policy",
                fraction=(it + (j + 1) / per_iteration) / iterations,
            )
        update = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in rew.items()}
        for k in rew:
            rew[k] += update[k]
        writer.save(
            "reward", rew, step=step, iteration=it, phase="reward", fraction=(it + 1) / iterations
        )
        prev = update


# ----------------------------------------------------------------------------- metrics
def test_identical_trajectories_give_disparity_0_angle_0_correlation_1() -> None:
    p = random_walk(12, 40)
    out = analyse({"policy": p, "reward": p.copy()})
    assert out["space"] == "shared-parameters"
    assert out["n_pairs"] == 11
    assert out["procrustes_disparity"] == pytest.approx(0.0, abs=1e-8)
    assert all(a == pytest.approx(0.0, abs=1e-4) for a in out["angle_updates_deg"])
    assert all(a == pytest.approx(0.0, abs=1e-4) for a in out["angle_velocities_deg"][1:])
    assert out["distance_correlation"]["overall"] == pytest.approx(1.0, abs=1e-6)
    per_step = out["distance_correlation"]["per_step"]
    assert per_step[:4] == [None] * 4  # fewer than MIN_PAIRS["distance_correlation"] = 5
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in per_step[4:])
    assert out["pearson"]["update_norms"] == pytest.approx(1.0, abs=1e-6)
    assert out["pearson"]["per_coordinate"]["weighted_mean"] == pytest.approx(1.0, abs=1e-6)
    json.dumps(out, allow_nan=False)  # JSON-serialisable, no NaN


def test_orthogonal_updates_give_90_degrees() -> None:
    rng = np.random.default_rng(1)
    n, d = 8, 30
    upd_p, upd_r = np.zeros((n, d)), np.zeros((n, d))
    upd_p[:, :10] = rng.normal(size=(n, 10))  # policy moves in coordinates 0..9
    upd_r[:, 20:] = rng.normal(size=(n, 10))  # reward in 20..29
    p = np.concatenate([np.zeros((1, d)), np.cumsum(upd_p, 0)])
    r = np.concatenate([np.zeros((1, d)), np.cumsum(upd_r, 0)])
    out = analyse({"policy": p, "reward": r})
    assert all(a == pytest.approx(90.0, abs=1e-4) for a in out["angle_updates_deg"])
    assert all(a == pytest.approx(90.0, abs=1e-4) for a in out["angle_velocities_deg"][1:])
    out = analyse({"policy": p, "reward": -p})
    assert all(a == pytest.approx(180.0, abs=1e-4) for a in out["angle_updates_deg"])


def test_rotated_copy_gives_procrustes_disparity_0() -> None:
    p = random_walk(15, 20, seed=2)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(20, 20)))
    out = analyse({"policy": p, "reward": p @ q})
    assert out["procrustes_disparity"] == pytest.approx(0.0, abs=1e-8)
    assert out["procrustes"]["p_value"] < 0.05


def test_without_shared_coordinates_only_basis_free_statistics_are_reported() -> None:
    """Different widths: each model on its own basis. Procrustes, dCor and the norms' Pearson
    do not need a common basis; angles and per-coordinate r do, and a rotation fitted to the
    same pairs would make independent updates look aligned, so they are n/a."""
    p = random_walk(10, 20, seed=4)
    basis, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(35, 20)))
    out = analyse({"policy": p, "reward": p @ basis.T})  # isometric copy in 35 dims
    assert out["space"] == "separate"
    assert out["procrustes_disparity"] == pytest.approx(0.0, abs=1e-8)
    assert out["distance_correlation"]["overall"] == pytest.approx(1.0, abs=1e-6)
    assert out["pearson"]["update_norms"] == pytest.approx(1.0, abs=1e-6)
    assert set(out["angle_updates_deg"]) == set(out["angle_velocities_deg"]) == {None}
    assert out["pearson"]["per_coordinate"]["n_coordinates"] == 0
    for name in ("angle_updates", "angle_velocities", "pearson_per_coordinate"):
        assert out["unavailable"][name] == "n/a: no shared coordinates"


def test_independent_updates_have_distance_correlation_near_0() -> None:
    out = analyse({"policy": random_walk(40, 30, 6), "reward": random_walk(40, 30, 7)})
    assert abs(out["distance_correlation"]["overall"]) < 0.15
    assert out["distance_correlation"]["p_value"] > 0.05
    assert out["procrustes_disparity"] > 0.5


def test_offset_pairs_reward_t_with_policy_t_plus_1() -> None:
    rng = np.random.default_rng(8)
    w = rng.normal(size=(9, 12))
    u = np.concatenate([rng.normal(size=(1, 12)), w[:-1]])  # u_{t+1} = w_t
    p = np.concatenate([np.zeros((1, 12)), np.cumsum(u, 0)])
    r = np.concatenate([np.zeros((1, 12)), np.cumsum(w, 0)])
    shifted = analyse({"policy": p, "reward": r}, offset=1)
    assert shifted["n_pairs"] == 8
    assert all(a == pytest.approx(0.0, abs=1e-4) for a in shifted["angle_updates_deg"])
    plain = analyse({"policy": p, "reward": r}, offset=0)
    assert np.mean(plain["angle_updates_deg"]) > 45


def test_iteration_pairing_uses_whole_iteration_moves() -> None:
    its = np.array([0, 0, 0, 1, 1, 2, 2])
    keys, labels = update_keypoints(its, "iteration")
    assert keys == [0, 2, 4, 6] and labels == [0, 1, 2]
    assert update_keypoints(its, "index") == (list(range(7)), list(range(6)))
    pol = Trajectory.from_array("policy", random_walk(7, 5), iterations=its)
    rew = Trajectory.from_array("reward", random_walk(4, 5, 1), iterations=[0, 0, 1, 2])
    pairs = pair_updates(pol, rew, offset=1)
    assert pairs.pairing == "iteration"
    np.testing.assert_allclose(pairs.policy[0], pol.points[4] - pol.points[2], rtol=1e-6)
    np.testing.assert_allclose(pairs.reward[0], rew.points[1] - rew.points[0], rtol=1e-6)


def test_primitives() -> None:
    assert angle_deg(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(45.0)
    assert math.isnan(angle_deg(np.zeros(3), np.ones(3)))
    x = np.random.default_rng(9).normal(size=(20, 3))
    assert distance_correlation(x, 2 * x + 1) == pytest.approx(1.0)
    assert distance_correlation(x, 2 * x + 1, unbiased=True) == pytest.approx(1.0)
    assert math.isnan(distance_correlation(x[:3], x[:3], unbiased=True))
    with pytest.raises(ValueError, match="needs both"):
        analyse(Trajectories.from_arrays(policy=x))


def test_distance_correlation_equals_dcor_and_pearson_equals_numpy() -> None:
    import dcor  # 5 s of numba kernels: imported here, not by the package
    rng = np.random.default_rng(10)
    for n, dx, dy in ((5, 3, 7), (12, 40, 40), (30, 1, 2)):
        x = rng.normal(size=(n, dx))
        y = x[:, :1] ** 2 + rng.normal(size=(n, dy))  # dependent, not linearly
        assert distance_correlation(x, y) == pytest.approx(dcor.distance_correlation(x, y))
        assert distance_correlation(x, y, unbiased=True) == pytest.approx(
            dcor.u_distance_correlation_sqr(x, y)
        )
        r = pearson(x[:, 0], y[:, 0])
        assert r == pytest.approx(np.corrcoef(x[:, 0], y[:, 0])[0, 1])
    assert math.isnan(distance_correlation(np.ones((6, 2)), rng.normal(size=(6, 2))))
    u, w = rng.normal(size=(6, 50)), rng.normal(size=(6, 50))
    per_coordinate = coordinate_pearson(u, w)
    expected = [np.corrcoef(u[:, d], w[:, d])[0, 1] for d in range(50)]
    assert per_coordinate["n_coordinates"] == 50
    assert per_coordinate["histogram"]["counts"] == np.histogram(
        expected, bins=np.linspace(-1, 1, 21)
    )[0].tolist()


def test_least_pairs_follow_from_the_null_distribution() -> None:
    """Why MIN_PAIRS: for independent samples, bias-corrected dCor^2 of 4 pairs piles up at
    +-1 (U-centred matrices span v = 2 dims) and Pearson r of 3 points too (v = 2); one pair
    more and values near 0 are the likeliest."""
    rng = np.random.default_rng(11)

    def share_near_one(statistic, n: int, draws: int = 400) -> float:
        values = [statistic(rng.normal(size=(n, 8)), rng.normal(size=(n, 8))) for _ in range(draws)]
        return float(np.mean(np.abs(values) > 0.95))

    def dcor_u(x, y):
        return distance_correlation(x, y, unbiased=True)

    def pearson_first(x, y):
        return pearson(x[:, 0], y[:, 0])

    assert MIN_PAIRS["distance_correlation"] == 5 and MIN_PAIRS["pearson"] == 4
    assert share_near_one(dcor_u, 4) > 0.1 > 0.02 > share_near_one(dcor_u, 5)
    assert share_near_one(pearson_first, 3) > 0.15 > share_near_one(pearson_first, 4)


def test_procrustes_keeps_fewer_dims_than_points_span() -> None:
    """n centred points span n - 1 dims; kept whole, independent high-dimensional update sets
    look congruent (disparity ~0). k = min(procrustes_k, n - 2) keeps the disparity
    informative: independent sets far from 0, related ones near it."""
    rng = np.random.default_rng(12)
    independent, related = [], []
    for _ in range(40):
        u = rng.normal(size=(4, 50))
        run = procrustes_test(u, rng.normal(size=(4, 50)), k=3, n_permutations=0)
        assert run["k"] == 2
        independent.append(run["disparity"])
        near = procrustes_test(u, u + 0.3 * rng.normal(size=(4, 50)), n_permutations=0)
        related.append(near["disparity"])
    assert np.median(independent) > 0.2 > 0.05 > np.median(related)
    assert procrustes_test(rng.normal(size=(2, 9)), rng.normal(size=(2, 9)))["disparity"] is None


def test_permutation_tests_are_exact_when_all_orders_fit() -> None:
    p = random_walk(6, 30, seed=13)  # 5 pairs: 5! = 120 orders <= 199
    out = analyse({"policy": p, "reward": p.copy()})
    assert out["procrustes"]["exact"] and out["procrustes"]["n_permutations"] == 120
    assert out["distance_correlation"]["p_value"] == pytest.approx(1 / 120)
    assert out["procrustes"]["p_value"] == pytest.approx(1 / 120)


@pytest.mark.parametrize(
    ("snapshots", "missing"),
    [
        (5, {"distance_correlation": "n/a: 4 pairs, needs \u2265 5"}),
        (4, {"distance_correlation": "n/a: 3 pairs, needs \u2265 5",
             "pearson": "n/a: 3 pairs, needs \u2265 4",
             "pearson_per_coordinate": "n/a: 3 pairs, needs \u2265 4"}),
        (3, {"distance_correlation": "n/a: 2 pairs, needs \u2265 5",
             "pearson": "n/a: 2 pairs, needs \u2265 4",
             "pearson_per_coordinate": "n/a: 2 pairs, needs \u2265 4",
             "procrustes": "n/a: 2 pairs, needs \u2265 3"}),
    ],
)  # fmt: skip
def test_too_few_pairs_are_reported_not_drawn(snapshots: int, missing: dict) -> None:
    from zopro_lightning.interplay.metrics_plots import metrics_figure, metrics_matplotlib

    p, r = random_walk(snapshots, 20, seed=15), random_walk(snapshots, 20, seed=16)
    out = analyse({"policy": p, "reward": r})
    assert out["unavailable"] == missing
    dc = out["distance_correlation"]
    assert dc["overall"] is None and dc["p_value"] is None and set(dc["per_step"]) == {None}
    if "pearson" in missing:
        assert out["pearson"]["update_norms"] is None
        assert out["pearson"]["per_coordinate"]["n_coordinates"] == 0
    else:
        assert out["pearson"]["update_norms"] is not None
    assert (out["procrustes_disparity"] is None) == ("procrustes" in missing)
    assert all(a is not None for a in out["angle_updates_deg"])
    json.dumps(out, allow_nan=False)

    fig = metrics_matplotlib(out)
    angles, dcor_panel, norms, histogram = fig.axes
    assert [t.get_text() for t in dcor_panel.texts] == [missing["distance_correlation"]]
    assert not [line for line in dcor_panel.lines if len(line.get_xdata()) > 2]  # no series
    if "pearson" in missing:
        assert missing["pearson"] in norms.get_title()
        assert [t.get_text() for t in histogram.texts] == [missing["pearson"]]
    if "procrustes" in missing:
        assert "Procrustes disparity " + missing["procrustes"] in fig._suptitle.get_text()
    annotations = [a.text for a in metrics_figure(out).layout.annotations]
    assert missing["distance_correlation"] in annotations


def test_one_pair_has_an_update_angle_and_no_velocity_angle() -> None:
    out = analyse({"policy": random_walk(2, 20, seed=17), "reward": random_walk(2, 20, seed=18)})
    assert out["angle_updates_deg"][0] is not None and "angle_updates" not in out["unavailable"]
    assert out["angle_velocities_deg"] == [None]
    assert out["unavailable"]["angle_velocities"] == "n/a: 1 pair, needs \u2265 2"


# ----------------------------------------------------------------------------- snapshots
def test_writer_loader_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    first = lora_tensors(g)
    writer = SnapshotWriter(tmp_path, max_numel=None)
    writer.save(
        "policy",
        {k: v.to(torch.bfloat16) for k, v in first.items()},
        step=0,
        iteration=0,
        phase="init",
        fraction=0.0,
    )
    second = lora_tensors(g)
    path = writer.save("policy", second, step=5, iteration=1, phase="policy", fraction=0.5)
    assert path.name == "policy_00001.safetensors"
    index = json.loads((tmp_path / "interplay" / "index.json").read_text())
    assert index[1] == {
        "file": "policy_00001.safetensors",
        "model": "policy",
        "step": 5,
        "iteration": 1,
        "phase": "policy",
        "fraction": 0.5,
    }
    assert not list((tmp_path / "interplay").glob(".*tmp"))

    # A resumed writer extends the same index and numbering.
    SnapshotWriter(tmp_path, max_numel=None).save(
        "reward",
        lora_tensors(g, score_head=True),
        step=5,
        iteration=1,
        phase="reward",
        fraction=0.5,
    )
    run = load_run(tmp_path)
    pol = run.policy
    assert pol is not None and run.reward is not None
    assert pol.points.dtype == np.float32 and pol.points.shape == (2, 256)
    assert pol.names == tuple(sorted(first))
    expected = np.concatenate([second[k].numpy().ravel() for k in sorted(second)])
    np.testing.assert_array_equal(pol.points[1], expected)
    assert list(pol.steps) == [0, 5] and pol.phases == ("init", "policy")
    space = common_space(pol, run.reward)
    assert space is not None and space.kind == "shared-parameters"
    assert space.policy.shape[1] == 256  # the score head has no policy twin


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    writer = SnapshotWriter(tmp_path, max_numel=None)
    writer.save("policy", {"w": torch.ones(3)}, step=0, iteration=0, phase="init", fraction=0)

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(snapshots_mod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        writer.save("policy", {"w": torch.ones(3)}, step=1, iteration=0, phase="p", fraction=1)
    files = sorted(p.name for p in (tmp_path / "interplay").iterdir())
    assert files == ["index.json", "policy_00000.safetensors"]
    assert len(json.loads((tmp_path / "interplay" / "index.json").read_text())) == 1


def test_projection_over_max_numel_is_the_same_for_every_snapshot(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base = lora_tensors(g)  # 256 values > max_numel = 32
    writer = SnapshotWriter(tmp_path, max_numel=32, projection_seed=7)
    writer.save("policy", base, step=0, iteration=0, phase="init", fraction=0.0)
    writer.save(
        "policy",
        {k: 2 * v for k, v in base.items()},
        step=1,
        iteration=0,
        phase="policy",
        fraction=1.0,
    )
    with safe_open(str(tmp_path / "interplay" / "policy_00000.safetensors"), "numpy") as fh:
        assert list(fh.keys()) == ["__projection__"]
        assert fh.metadata()["source_numel"] == "256"
        stored = fh.get_tensor("__projection__")
    arrays = {k: v.numpy() for k, v in base.items()}
    np.testing.assert_allclose(stored, count_sketch(arrays, 32, seed=7), rtol=1e-6)
    run = load_run(tmp_path)
    pol = run.policy
    assert pol is not None and pol.dim == 32 and pol.projection["seed"] == 7
    np.testing.assert_allclose(pol.points[1], 2 * pol.points[0], rtol=1e-5)  # linear, same S
    assert not np.allclose(count_sketch(arrays, 32, seed=8), stored)


def test_count_sketch_keeps_inner_products_roughly() -> None:
    rng = np.random.default_rng(10)
    x = {"a": rng.normal(size=(100, 200)), "b": rng.normal(size=5000)}
    y = {k: v + 0.5 * rng.normal(size=v.shape) for k, v in x.items()}
    sx, sy = count_sketch(x, 4000), count_sketch(y, 4000)
    dot = sum(float(np.sum(x[k] * y[k])) for k in x)
    assert float(sx @ sy) == pytest.approx(dot, rel=0.1)


def test_inconsistent_snapshots_are_rejected(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path)
    writer.save("policy", {"w": torch.ones(3)}, step=0, iteration=0, phase="init", fraction=0)
    writer.save("policy", {"w": torch.ones(4)}, step=1, iteration=0, phase="p", fraction=1)
    with pytest.raises(ValueError, match="same trainable set"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        writer.save("policy", {"__x": torch.ones(1)}, step=2, iteration=0, phase="p", fraction=1)
    with pytest.raises(ValueError, match="model must be"):
        writer.save("critic", {"w": torch.ones(3)}, step=2, iteration=0, phase="p", fraction=1)


def test_load_peft_adapters(tmp_path: Path) -> None:
    dirs = []
    for i in range(3):
        d = tmp_path / f"adapter{i}"
        d.mkdir()
        save_file(
            {
                "b.lora_B.weight": np.full((2, 2), i, np.float32),
                "a.lora_A.weight": np.arange(3, dtype=np.float32),
            },
            str(d / "adapter_model.safetensors"),
        )
        dirs.append(d)
    mat = load_peft_adapters(dirs)
    assert mat.shape == (3, 7) and mat.dtype == np.float32
    np.testing.assert_array_equal(mat[2], [0, 1, 2, 2, 2, 2, 2])  # sorted keys: a then b
    with pytest.raises(FileNotFoundError):
        load_peft_adapters([tmp_path / "nowhere"])


def test_missing_run_dir_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_run(tmp_path / "nope")
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no interplay snapshots" in err and "index.json" in err


# ----------------------------------------------------------------------------- projections
def test_projections_handle_few_points() -> None:
    pts = random_walk(3, 50)
    with pytest.warns(UserWarning, match="t-SNE needs"):
        coords, _, used = embed(pts, "tsne", 2)
    assert used == "pca" and coords.shape == (3, 2)
    with pytest.warns(UserWarning, match="UMAP needs"):
        coords, _, used = embed(pts[:2], "umap", 3)
    assert used == "pca" and coords.shape == (2, 3)
    coords, labels, _ = embed(pts[:2], "pca", 3)  # 2 points span 1 direction: padded
    assert coords.shape == (2, 3) and np.all(coords[:, 1:] == 0)
    assert labels[0].startswith("PC1")
    coords, _, used = embed(random_walk(6, 50), "tsne", 3)
    assert used == "tsne" and coords.shape == (6, 3)


def test_extrapolation_continues_a_line() -> None:
    line = np.stack([np.arange(5.0), 2 * np.arange(5.0)], axis=1)
    np.testing.assert_allclose(extrapolate_linear(line, 2), [[5, 10], [6, 12]], atol=1e-9)
    assert extrapolate_linear(line[:1], 3).shape == (0, 2)


def test_joint_and_separate_projection(tmp_path: Path) -> None:
    write_run(tmp_path)
    run = load_run(tmp_path)
    joint = project(run, "pca", 2, extrapolate=2)
    assert joint.mode == "joint"
    assert joint.coords["policy"].shape == (13, 2) and joint.coords["reward"].shape == (7, 2)
    np.testing.assert_allclose(joint.coords["policy"][0], joint.coords["reward"][0], atol=1e-9)
    assert joint.extrapolated["policy"].shape == (2, 2)
    separate = project(run, "pca", 3, mode="separate")
    assert separate.mode == "separate" and separate.coords["reward"].shape == (7, 3)


@pytest.mark.slow
def test_umap_projection_runs() -> None:
    coords, labels, used = embed(random_walk(12, 40), "umap", 2)
    assert used == "umap" and coords.shape == (12, 2) and labels[0] == "UMAP 1"


# ----------------------------------------------------------------------------- CLI
def test_cli_writes_png_html_json(tmp_path: Path, capsys) -> None:
    write_run(tmp_path, max_numel=100)  # policy 256, reward 272 values: both sketched
    assert (
        main([str(tmp_path), "--offset", "1", "--methods", "pca,tsne", "--extrapolate", "2"]) == 0
    )
    plots = tmp_path / "plots"
    names = {p.name for p in plots.iterdir()}
    expected = {f"trajectory_{m}_{d}d.png" for m in ("pca", "tsne") for d in (2, 3)}
    assert expected | {"metrics.png", "interplay.html", "interplay.json"} <= names
    for name in expected | {"metrics.png"}:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (plots / "interplay.html").read_text()
    assert "plotly" in html and html.count("Plotly.newPlot") == 5
    result = json.loads((plots / "interplay.json").read_text())
    assert result["offset"] == 1 and result["space"] == "shared-sketch"
    assert result["pairing"] == "iteration" and result["n_pairs"] == 5
    assert result["snapshots"]["policy"] == {"n": 13, "dim": 100, "projected": True}
    out = capsys.readouterr().out
    assert "Procrustes disparity" in out and "wrote" in out


def test_cli_with_only_policy_snapshots_and_no_html(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path)
    for i in range(5):
        writer.save(
            "policy",
            {"w": torch.full((6,), float(i)) + torch.arange(6.0) * i**2},
            step=i,
            iteration=i,
            phase="policy",
            fraction=i / 4,
        )
    assert main([str(tmp_path), "--methods", "pca", "--dims", "2", "--no-html"]) == 0
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert names == {"trajectory_pca_2d.png", "interplay.json"}
    assert "needs both" in json.loads((tmp_path / "plots" / "interplay.json").read_text())["error"]
    assert main([str(tmp_path), "--methods", "lda"]) == 2


def test_tsne_in_3d_of_points_spanning_two_directions_starts_from_a_random_layout():
    """A short run: 5 points in a plane; t-SNE's PCA start would need 3 directions."""
    from zopro_lightning.interplay.projections import embed

    rng = np.random.default_rng(0)
    plane = rng.normal(size=(5, 2)) @ rng.normal(size=(2, 30))
    coords, labels, used = embed(plane, "tsne", 3)
    assert used == "tsne" and coords.shape == (5, 3) and np.isfinite(coords).all()
    again, _, _ = embed(plane, "tsne", 3)
    np.testing.assert_allclose(coords, again)  # seeded
