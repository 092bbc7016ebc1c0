"""Config that cannot be misread: keys that do not apply are errors, older keys still load."""

from __future__ import annotations

import logging
import pickle
import tomllib
from pathlib import Path

import pytest
import torch

from hetlora import config as config_module
from hetlora import methods
from hetlora.config import KEY_RULES, METHODS, Config, load_config, make_config, rules_markdown
from hetlora.errors import HetLoRAError
from hetlora.methods.base import Reply
from hetlora.methods.hetlora import HetLoRAServer
from hetlora.runtime import checkpoint

# key -> (a value other than its default, a config where the key does not apply, one where it does)
CASES = {
    "rank": (8, {"method": "hetlora"}, {"method": "homlora"}),
    "tiers": ([{"name": "p", "rank": 4}], {"method": "homlora"}, {"method": "recon_svd"}),
    "pruning": (False, {"method": "flora"}, {"method": "hetlora"}),
    "lambda_": (0.1, {"method": "hetlora", "pruning": False}, {"method": "hetlora"}),
    "gamma": (0.5, {"method": "homlora"}, {"method": "hetlora"}),
    "aggregation": ("uniform", {"method": "recon_svd"}, {"method": "hetlora"}),
    "per_module_weights": (
        True,
        {"aggregation": "uniform"},
        {"aggregation": "sparsity_data_size"},
    ),
    "padding": ("keep", {"method": "homlora"}, {"method": "hetlora"}),
    "svd_path": ("qr", {"method": "fedex"}, {"method": "recon_svd"}),
    "dp_clip_norm": (
        1.0,
        {"method": "flora"},
        {"method": "homlora", "dp_noise_multiplier": 1.0},
    ),
    "dp_noise_multiplier": (1.0, {}, {"method": "ffa", "dp_clip_norm": 1.0}),
    "dp_target_epsilon": (8.0, {"method": "homlora"}, {"method": "homlora", "dp_clip_norm": 1.0}),
    "dp_delta": (1e-6, {}, {"method": "ffa", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}),
    "dp_noise_seed": (5, {}, {"method": "ffa", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}),
    "r_min": (5, {"method": "full_ft"}, {"method": "recon_svd"}),
    "r_max": (50, {"method": "full_ft"}, {"method": "homlora"}),
    "lora_scale": (1.0, {"method": "full_ft"}, {"method": "flora"}),
    "target_modules": (["q_proj"], {"method": "full_ft"}, {"method": "homlora"}),
    "on_bad_rows": ("skip", {}, {"data": "x.jsonl"}),
    "split": ("train", {}, {"data": "some/hub-dataset"}),
    "partitioner": ("dirichlet", {}, {"data": "x.jsonl"}),
    "num_partitions": (3, {}, {"data": "x.jsonl"}),
    "partition_by": ("lang", {"data": "x.jsonl"}, {"data": "x.jsonl", "partitioner": "dirichlet"}),
    "dirichlet_alpha": (
        0.1,
        {"data": "x.jsonl"},
        {"data": "x.jsonl", "partitioner": "dirichlet"},
    ),
}


def test_every_rule_has_a_case():
    assert set(CASES) == {r.key for r in KEY_RULES}
    assert len(KEY_RULES) == len({r.key for r in KEY_RULES})  # one rule per key


@pytest.mark.parametrize("key", list(CASES))
def test_a_key_that_does_not_apply_is_an_error_naming_it(key):
    value, elsewhere, applies = CASES[key]
    assert value != getattr(Config(), key)
    with pytest.raises(HetLoRAError) as err:
        make_config({**elsewhere, key: value})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config key '{key}' = ") and "applies to" in message
    cfg = make_config({**applies, key: value})  # where it applies it is taken
    assert getattr(cfg, key) == value
    # at its default it is accepted anywhere: that is what `hetlora defaults` and config.toml hold
    default = getattr(Config(), key)
    assert getattr(make_config({**elsewhere, key: default}), key) == default


@pytest.mark.parametrize("method", METHODS)
def test_the_defaults_load_under_every_method(method, tmp_path):
    path = tmp_path / "config.toml"
    Config(method=method).save(path)
    assert load_config(path) == Config(method=method)


def test_the_cli_refuses_a_key_of_another_method(tmp_path):
    from typer.testing import CliRunner

    from hetlora.cli import app

    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "o"), "--set", "rank=4"])
    assert result.exit_code == 2
    assert "'rank' = 4 applies to method = 'homlora' only" in result.output
    assert not (tmp_path / "o").exists()


def test_the_configuration_page_has_the_rules_table():
    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert rules_markdown() in page


def test_names_are_defined_once():
    assert methods.METHODS is config_module.METHODS


# -- older keys --------------------------------------------------------------------------------


def _old(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_an_older_config_toml_loads_with_a_warning(tmp_path, caplog):
    old = Config().to_toml() + 'rank_distribution = "uniform"\ndata_size_factor = false\n'
    with caplog.at_level(logging.WARNING, logger="hetlora.config"):
        cfg = load_config(_old(tmp_path, old))
    assert cfg == Config()
    assert "rank_distribution = 'uniform'" in caplog.text
    assert "data_size_factor = false" in caplog.text


def test_older_keys_keep_their_meaning(tmp_path):
    tiers = 'tiers = [{ name = "a", rank = 4, share = 1.0 }]\n'
    cfg = load_config(_old(tmp_path, 'rank_distribution = "tiers"\n' + tiers))
    assert cfg.tiers == [{"name": "a", "rank": 4, "share": 1.0}]
    assert load_config(_old(tmp_path, "data_size_factor = true\n")).aggregation == (
        "sparsity_data_size"
    )
    # where it had no effect (another aggregation or method) it is dropped
    uniform = load_config(_old(tmp_path, 'data_size_factor = true\naggregation = "uniform"\n'))
    assert uniform.aggregation == "uniform"
    homlora = load_config(_old(tmp_path, 'data_size_factor = true\nmethod = "homlora"\n'))
    assert homlora.aggregation == "sparsity"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('rank_distribution = "tiers"\n', "needs a [[tiers]] list"),
        (
            'rank_distribution = "uniform"\ntiers = [{ rank = 4 }]\n',
            "cannot be translated",
        ),
        ('rank_distribution = "zipf"\n', "must be one of uniform, tiers"),
        ('data_size_factor = "yes"\n', "must be true or false"),
    ],
)
def test_older_keys_that_cannot_be_read_are_one_line_errors(tmp_path, text, fragment):
    with pytest.raises(HetLoRAError, match="rank_distribution|data_size_factor") as err:
        load_config(_old(tmp_path, text))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_an_older_checkpoint_matches_its_translated_config():
    old = {**Config().to_dict(), "rank_distribution": "uniform", "data_size_factor": False}
    checkpoint.check_matches(
        {"config": old, "model": "m", "data": "d"}, Config().to_dict(), "m", "d"
    )
    with pytest.raises(HetLoRAError, match="aggregation"):
        checkpoint.check_matches(
            {"config": {**old, "data_size_factor": True}, "model": "m", "data": "d"},
            Config().to_dict(),
            "m",
            "d",
        )


def test_an_older_pickled_hetlora_server_aggregates_as_before():
    g = torch.Generator().manual_seed(0)
    start = {"m": (torch.randn(5, 4, generator=g), torch.randn(4, 3, generator=g))}
    ranks = {"a": 4, "b": 2}
    updates = [
        Reply(c, n, factors={"m": (torch.randn(5, r, generator=g), torch.randn(r, 3))}, rank=r)
        for (c, r), n in zip(ranks.items(), (30, 5), strict=True)
    ]
    today = HetLoRAServer(start, ranks, aggregation="sparsity_data_size")
    older = HetLoRAServer(start, ranks)
    older.options = {"aggregation": "sparsity", "per_module": False, "data_size_factor": True}
    older.options["padding"] = "zero"
    older = pickle.loads(pickle.dumps(older))  # what --resume reads from an older checkpoint
    assert older.options == today.options
    for server in (today, older):
        for u in updates:
            server.add(u)
        server.finish()
    for x, y in zip(today.state.factors["m"], older.state.factors["m"], strict=True):
        assert torch.equal(x, y)


def test_every_shipped_config_loads():
    from hetlora.study.compare import load_comparison

    root = Path(__file__).parents[1]
    for path in sorted((root / "configs").glob("*.toml")):
        if "compare" in tomllib.loads(path.read_text()):
            assert load_comparison(path)
        else:
            load_config(path)


def test_a_checkpoint_from_before_a_key_existed_resumes_at_its_default():
    current = Config().to_dict()
    older = {k: v for k, v in current.items() if k not in ("compile", "on_bad_rows", "padding")}
    checkpoint.check_matches({"config": older, "model": "m", "data": "d"}, current, "m", "d")
    # a non-default value of a key the checkpoint predates is a real difference
    with pytest.raises(HetLoRAError, match=r"differs in: compile\)"):
        checkpoint.check_matches(
            {"config": older, "model": "m", "data": "d"}, {**current, "compile": "on"}, "m", "d"
        )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"seed": -1}, "config key 'seed' must lie in [0, 2**63), got -1"),
        ({"seed": 2**63}, "config key 'seed' must lie in [0, 2**63)"),
        (
            {"min_clients": 5, "clients_per_round": 4},
            "config key 'min_clients' (5) must not exceed clients_per_round (4): every round "
            "would be skipped",
        ),
        (
            {"max_new_tokens": 0, "rouge_examples": 3},
            "config key 'max_new_tokens' must be >= 1 when rouge_examples > 0",
        ),
    ],
)
def test_values_that_would_fail_mid_run_are_refused_up_front(values, message):
    with pytest.raises(HetLoRAError) as err:
        make_config(values)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_edges_of_those_values_are_accepted():
    assert make_config({"seed": 0}).seed == 0
    assert make_config({"seed": 2**63 - 1}).seed == 2**63 - 1
    assert make_config({"min_clients": 4, "clients_per_round": 4}).min_clients == 4
    assert make_config({"max_new_tokens": 0, "rouge_examples": 0}).max_new_tokens == 0


def test_a_model_path_is_stored_absolute_and_older_relative_checkpoints_match(
    tmp_path, monkeypatch
):
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "models" / "m")
    for given in ("models/m", "./models/m", "models/../models/m", absolute):
        assert make_config({"model": given}).model == absolute
    # the packaged name and a hub id stay as they are, even where a folder of that name exists
    (tmp_path / "smollm2-135m").mkdir()
    assert make_config({}).model == "smollm2-135m"
    assert make_config({"model": "owner/name"}).model == "owner/name"
    # a checkpoint of an older run, whose config kept the relative path, resumes from its folder
    current = make_config({"model": "models/m"}).to_dict()
    older = {**current, "model": "models/m"}
    checkpoint.check_matches(
        {"version": 2, "config": older, "model": "m", "data": "d"}, current, "m", "d"
    )


def test_rank_bounds_apply_to_lora_methods_only(tmp_path, caplog):
    """r_min and r_max under full_ft are an error; a comparison's shared r_max is its LoRA
    entries' only; a run's own config.toml written with them loads, naming them in a warning."""
    from hetlora.study.compare import load_comparison

    for key, value in (("r_min", 5), ("r_max", 50)):
        with pytest.raises(HetLoRAError, match=f"'{key}' = {value} applies to LoRA methods"):
            make_config({"method": "full_ft", key: value})
    study = tmp_path / "study.toml"
    study.write_text(
        'r_min = 5\nr_max = 50\n[[compare]]\nname = "full"\nmethod = "full_ft"\n'
        '[[compare]]\nname = "het"\nmethod = "hetlora"\n'
    )
    full, het = load_comparison(study)
    assert (full.cfg.r_min, full.cfg.r_max) == (Config.r_min, Config.r_max) == (4, 16)
    assert (het.cfg.r_min, het.cfg.r_max) == (5, 50)
    study.write_text('[[compare]]\nname = "full"\nmethod = "full_ft"\nr_max = 50\n')
    with pytest.raises(HetLoRAError, match="entry 'full'.*'r_max' = 50 applies to LoRA"):
        load_comparison(study)
    stored = tmp_path / "config.toml"
    stored.write_text(Config(method="full_ft").to_toml().replace("r_max = 16", "r_max = 50"))
    with pytest.raises(HetLoRAError, match="'r_max' = 50"):
        load_config(stored)
    with caplog.at_level(logging.WARNING, logger="hetlora.config"):
        assert load_config(stored, stored=True) == Config(method="full_ft")
    assert "r_max did not apply to this run" in caplog.text


def test_the_configuration_page_is_generated_from_the_keys():
    """docs/configuration.md is what tools/config_reference.py writes from the keys' docs."""
    import importlib.util

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("ref", root / "tools" / "config_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    assert (root / "docs" / "configuration.md").read_text() == ref.page()


def test_every_key_has_a_description_and_defaults_read_back():
    import tomllib

    from hetlora.config import defaults_toml, key_docs

    docs = key_docs()
    assert [k for _, k, _, _ in docs] == list(Config().to_dict())
    assert all(len(doc) > 10 for _, _, _, doc in docs)
    assert tomllib.loads(defaults_toml()) == Config().to_dict()
