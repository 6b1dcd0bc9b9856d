import csv
import json

import numpy as np
import pytest

from zopro_lightning.run.gather import by_configuration, gather, main, shared_overrides


def fake_run(root, name, overrides, **summary):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "summary.json").write_text(json.dumps(summary))


def test_gather_writes_markdown_and_csv(tmp_path):
    fake_run(tmp_path, "0", ["sampler=zopro", "seed=1"], sampler="zopro", gold_reward_final=0.2)
    fake_run(
        tmp_path, "1", ["sampler=gaussian", "seed=1"], sampler="gaussian", gold_reward_final=0.1
    )
    rows = gather(tmp_path)
    assert [r["overrides"] for r in rows] == ["sampler=gaussian seed=1", "sampler=zopro seed=1"]
    assert main([str(tmp_path)]) == 0
    table = (tmp_path / "summary.md").read_text()
    assert table.startswith("Overrides shared by every run: `seed=1`\n")
    assert "| sampler=zopro | 1 | 1 | zopro | 0.2 |" in table  # runs, seeds, sampler, value
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3


def test_gather_of_an_empty_directory_says_what_to_pass(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().out


def test_gather_gives_mean_and_sd_per_configuration_with_shared_overrides_once(tmp_path):
    finals = {"zopro": [0.2, 0.3, 0.4], "gaussian": [0.1, 0.15, 0.2]}
    for sampler, values in finals.items():
        for seed, value in enumerate(values):
            fake_run(
                tmp_path,
                f"{sampler}{seed}",
                ["experiment=tiny", f"sampler={sampler}", f"seed={seed}", "loop.steps=3"],
                task="sentiment",
                sampler=sampler,
                seed=seed,
                gold_reward_final=value,
                policy_steps=10 + seed,
            )
    lone = ["experiment=tiny", "sampler=zopro", "seed=0", "loop.steps=3", "policy.eps=0.1"]
    fake_run(tmp_path, "lone", lone, sampler="zopro", seed=0, gold_reward_final=0.5)
    rows = gather(tmp_path)
    assert shared_overrides(rows) == ["experiment=tiny", "loop.steps=3"]
    configurations = {c["configuration"]: c for c in by_configuration(rows, shared_overrides(rows))}
    assert set(configurations) == {
        "sampler=gaussian",
        "sampler=zopro",
        "sampler=zopro policy.eps=0.1",
    }
    zopro = configurations["sampler=zopro"]
    assert zopro["runs"] == 3 and zopro["seeds"] == ["0", "1", "2"]
    mean, sd = zopro["gold_reward_final"]
    assert mean == pytest.approx(0.3) and sd == pytest.approx(np.std([0.2, 0.3, 0.4], ddof=1))
    assert zopro["policy_steps"] == (pytest.approx(11.0), pytest.approx(1.0))
    assert zopro["sampler"] == "zopro" and zopro["task"] == "sentiment"
    lone = configurations["sampler=zopro policy.eps=0.1"]
    assert lone["gold_reward_final"] == (pytest.approx(0.5), None)  # one run: no sd

    assert main([str(tmp_path)]) == 0
    table = (tmp_path / "summary.md").read_text()
    head, _, rest = table.partition("\n")
    assert head == "Overrides shared by every run: `experiment=tiny` `loop.steps=3`"
    assert "experiment=tiny" not in rest and "loop.steps=3" not in rest  # shown once, above
    assert "| sampler=zopro | 3 | 0, 1, 2 |" in table and "0.3 ± 0.1 |" in table
    assert "| sampler=zopro policy.eps=0.1 | 1 | 0 |" in table and "| 0.5 |" in table
    with open(tmp_path / "summary_by_configuration.csv") as handle:
        by_config = {row["configuration"]: row for row in csv.DictReader(handle)}
    assert float(by_config["sampler=gaussian"]["gold_reward_final_mean"]) == pytest.approx(0.15)
    assert float(by_config["sampler=gaussian"]["gold_reward_final_sd"]) == pytest.approx(0.05)
    assert by_config["sampler=zopro policy.eps=0.1"]["gold_reward_final_sd"] == ""
    assert (tmp_path / "summary.csv").read_text().count("\n") == 8  # one row a run, header
