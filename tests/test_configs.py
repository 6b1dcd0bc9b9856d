"""Every shipped config composes (Hydra's own checks), without building anything."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIONS = [
    f"{group.name}={option.stem}"
    for group in sorted(p for p in CONF.iterdir() if p.is_dir())
    for option in sorted(group.glob("*.yaml"))
]


@pytest.mark.parametrize("override", OPTIONS)
def test_config_composes(override):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[override])
    assert cfg.model is not None and cfg.dataset.name


def test_unknown_group_option_is_refused():
    from hydra.errors import MissingConfigException

    with (
        initialize_config_dir(config_dir=str(CONF), version_base="1.3"),
        pytest.raises(MissingConfigException),
    ):
        compose("config", overrides=["sampler=does_not_exist"])
