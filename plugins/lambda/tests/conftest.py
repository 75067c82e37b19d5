"""Offline and isolated, like the core tests: never reach the Hugging Face hub, never touch the user's home."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANORL_HOME", str(tmp_path / "nanorl-home"))
