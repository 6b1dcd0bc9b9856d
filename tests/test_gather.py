import json

from zopro_lightning.gather import gather, main


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
    assert "sampler=zopro seed=1" in table and "0.2" in table
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3


def test_gather_of_an_empty_directory_says_what_to_pass(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().out
