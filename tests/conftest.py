"""Test setup shared by every test: offline, isolated from the user's home, deterministic."""

import os

# Never reach the Hugging Face hub or wandb's servers from a test (wandb with a key and no mode hangs ~100 s).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own NANORL_HOME, and the process-wide plugin set is rebuilt afterwards."""
    monkeypatch.setenv("NANORL_HOME", str(tmp_path / "nanorl-home"))
    yield
    from nanorl.plugins import reset_plugins

    reset_plugins()
