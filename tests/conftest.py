"""Shared fixtures: private caches, and a tiny random Llama built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports huggingface_hub, which reads these once: tests never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# Under pytest-xdist (`make test` runs 3 workers) each worker gets its share of the cores, at least
# one thread, for torch here and in the processes the tests start.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))


# The tests that take tens of seconds (real processes, the real default model, torch.compile),
# longest first. `make test` hands out one test at a time (--maxschedchunk 1), so these start
# first and the workers finish together instead of one waiting on another's last long test.
SLOW = (
    "test_flower.py::test_deployment_gives_the_in_process_adapter_and_refuses_an_unregistered_node",
    "test_readme.py::test_every_readme_command_and_snippet_runs_as_pasted",
    "test_bad_inputs.py::test_every_bad_input_is_one_line_exit_2_and_loses_nothing",
    "test_flower.py::test_simulation_runtime_gives_the_in_process_adapter",
    "test_bench.py::test_bench_smoke_writes_every_key",
    "test_default_model.py::test_short_run_on_default_model",
    "test_readme.py::test_docs_pages_marked_blocks_run_as_pasted",
    "test_client_mutants.py::test_step_and_compile_seconds_are_counted_apart",
    "test_reliability.py::test_sigkill_then_resume_matches_an_uninterrupted_run",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first (every test still runs; only the order changes)."""
    rank = {name: i for i, name in enumerate(SLOW)}
    items.sort(key=lambda item: rank.get(item.nodeid.removeprefix("tests/"), len(SLOW)))


@pytest.fixture(autouse=True)
def _private_caches(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep Hugging Face's and hetlora's caches out of the user's home, and stay offline."""
    root = tmp_path_factory.getbasetemp()
    # the pytest-xdist workers of one session share hetlora's cache (the default model,
    # converted once under a lock), each keeps its own Hugging Face cache
    shared = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HETLORA_CACHE", str(shared / "hetlora-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised Llama with a 512-token BPE tokenizer."""
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama of ``tiny_model`` with a chat template on its tokenizer."""
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-chat-llama"), chat_template=True)
