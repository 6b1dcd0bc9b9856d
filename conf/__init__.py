"""The Hydra configs of ``zopro-train``, shipped as the package ``zopro_lightning.conf``
(``pkg://zopro_lightning.conf``; see ``[tool.setuptools]`` in pyproject.toml)."""
