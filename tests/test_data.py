"""Tests of hetlora.data: Shakespeare parsing, user files, partitioning, splits, errors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetlora.data import Example, cap_examples, load_clients, split_clients, split_validation
from hetlora.data.shakespeare import load_shakespeare, parse_play
from hetlora.errors import HetLoRAError


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep Hugging Face caches out of the user's home."""
    hf = tmp_path_factory.mktemp("hf")
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def text_rows(n: int, *, labels: int = 4) -> list[dict]:
    return [{"text": f"line {i}", "label": f"l{i % labels}"} for i in range(n)]


# --- Shakespeare -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare() -> dict[str, list[Example]]:
    return load_shakespeare()


def test_shakespeare_sizes(shakespeare: dict[str, list[Example]]) -> None:
    sizes = [len(v) for v in shakespeare.values()]
    assert 700 <= len(shakespeare) <= 2000
    assert 25_000 <= sum(sizes) <= 35_000
    assert 50 <= sum(s >= 100 for s in sizes) <= 120
    plays = {cid.split("/", 1)[0] for cid in shakespeare}
    assert len(plays) == 38
    assert list(shakespeare) == sorted(shakespeare)


def test_shakespeare_hamlet_example(shakespeare: dict[str, list[Example]]) -> None:
    hamlet = shakespeare["hamlet/HAMLET"]
    assert len(hamlet) > 300
    first = hamlet[0]
    assert first.prompt.startswith("KING CLAUDIUS: ")
    assert first.prompt.endswith("\nHAMLET:")
    assert first.response == " A little more than kin, and less than kind."
    for ex in hamlet:
        assert re.fullmatch(r"[^\n:]+: .+\nHAMLET:", ex.prompt, flags=re.S)
        assert ex.response.startswith(" ") and ex.response.strip()
    soliloquy = next(ex for ex in hamlet if "To be, or not to be" in ex.response)
    assert "\n" in soliloquy.response
    assert not any(line != line.rstrip() for line in soliloquy.response.split("\n"))


def test_shakespeare_no_stage_directions(shakespeare: dict[str, list[Example]]) -> None:
    direction = re.compile(r"(^|\n)\s*[_*\[\\#]|[_*]\s*($|\n)|\*\*")
    for cid, examples in shakespeare.items():
        for ex in examples:
            assert not direction.search(ex.response), (cid, ex.response)
            assert not direction.search(ex.prompt), (cid, ex.prompt)
    # First speech of Hamlet's opening scene has no previous speech: not an example.
    assert not any(ex.response == " Who's there?" for ex in shakespeare["hamlet/BERNARDO"])


def test_shakespeare_is_cached_and_copies(shakespeare: dict[str, list[Example]]) -> None:
    again = load_shakespeare()
    assert again == shakespeare
    again["hamlet/HAMLET"].clear()
    assert load_shakespeare()["hamlet/HAMLET"]


def test_parse_play_format() -> None:
    text = (
        "# Demo\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A and B_\n\n"
        "**A**  \nFirst line,  \nsecond line.\n\n"
        "**B**  \n_Aside_\nReply \\--here.  \n_\\[Sings]_  \nMore.\n\n"
        "_Enter C, with a long\nentrance direction_\n\n"
        "DEMO\n\n**A**  \nLast.\n\n### SCENE II. Elsewhere.\n\n**C**  \nAlone.\n"
    )
    assert parse_play(text) == [
        [("A", "First line,\nsecond line."), ("B", "Reply --here.\nMore."), ("A", "Last.")],
        [("C", "Alone.")],
    ]


def test_load_clients_shakespeare_min_examples(caplog: pytest.LogCaptureFixture) -> None:
    full = load_clients("shakespeare")
    with caplog.at_level(logging.INFO, logger="hetlora.data"):
        big = load_clients("shakespeare", min_examples=100)
    assert list(big) == sorted(big)
    assert all(len(v) >= 100 for v in big.values())
    assert set(big) == {k for k, v in full.items() if len(v) >= 100}
    assert f"dropped {len(full) - len(big)} of {len(full)} clients" in caplog.text


def test_min_examples_nothing_left() -> None:
    with pytest.raises(
        HetLoRAError, match=r"no client .* at least 100000 examples .*clients before"
    ):
        load_clients("shakespeare", min_examples=100_000)


# --- split_clients -------------------------------------------------------------------------


def make_clients() -> dict[str, list[Example]]:
    return {
        f"c{c}": [Example(prompt=f"p{c}-{i}", response=f" r{c}-{i}") for i in range(n)]
        for c, n in enumerate([1, 2, 3, 10, 57])
    }


def test_split_properties() -> None:
    clients = make_clients()
    train, test = split_clients(clients, 0.2, seed=1)
    assert set(train) == set(test) == set(clients)
    for cid, examples in clients.items():
        tr, te = train[cid], test[cid]
        assert tr, cid
        assert not set(tr) & set(te)
        assert sorted(tr + te, key=examples.index) == examples
        assert [examples.index(e) for e in tr] == sorted(examples.index(e) for e in tr)
        if len(examples) >= 2:
            assert te, cid
    assert len(test["c4"]) == round(0.2 * 57)
    assert test["c0"] == []


def test_split_determinism() -> None:
    clients = make_clients()
    assert split_clients(clients, 0.3, seed=7) == split_clients(clients, 0.3, seed=7)
    assert split_clients(clients, 0.3, seed=7) != split_clients(clients, 0.3, seed=8)
    # A client's split does not depend on the other clients.
    alone = {"c4": clients["c4"]}
    assert (
        split_clients(alone, 0.3, seed=7)[1]["c4"] == split_clients(clients, 0.3, seed=7)[1]["c4"]
    )


def test_split_zero_fraction() -> None:
    clients = make_clients()
    train, test = split_clients(clients, 0.0, seed=0)
    assert train == clients
    assert all(v == [] for v in test.values())


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_split_bad_fraction(fraction: float) -> None:
    with pytest.raises(HetLoRAError, match="test_fraction must be in"):
        split_clients(make_clients(), fraction, seed=0)


def test_split_empty_client() -> None:
    with pytest.raises(HetLoRAError, match="client 'empty' has no examples"):
        split_clients({"empty": []}, 0.1, seed=0)


# --- split_validation and cap_examples ---------------------------------------------------


def test_validation_split_is_separate_seeded_and_leaves_the_test_split_alone() -> None:
    clients = make_clients()
    sizes = {c: len(v) for c, v in clients.items()}
    train, test = split_clients(clients, 0.2, seed=3)
    kept, val = split_validation(train, sizes, 0.25, seed=3)
    for cid, examples in clients.items():
        tr, va, te = kept[cid], val[cid], test[cid]
        assert tr, cid
        assert not set(tr) & set(va) and not set(va) & set(te)
        assert sorted(tr + va + te, key=examples.index) == examples  # a partition
        assert [examples.index(e) for e in va] == sorted(examples.index(e) for e in va)
    assert len(val["c4"]) == round(0.25 * 57)  # a share of all the client's examples
    assert len(val["c3"]) == round(0.25 * 10) and val["c1"] == [] and val["c2"] != []
    assert split_validation(train, sizes, 0.25, seed=3) == (kept, val)
    assert split_validation(train, sizes, 0.25, seed=4)[1] != val
    assert split_validation(train, sizes, 0.0, seed=3) == (train, {c: [] for c in train})


def test_cap_examples_keeps_a_seeded_ordered_subset() -> None:
    clients = make_clients()
    capped = cap_examples(clients, 5, seed=1)
    assert [len(v) for v in capped.values()] == [1, 2, 3, 5, 5]
    for cid, kept in capped.items():
        order = [clients[cid].index(e) for e in kept]
        assert order == sorted(order)
    assert capped == cap_examples(clients, 5, seed=1)
    assert capped["c4"] != cap_examples(clients, 5, seed=2)["c4"]
    assert capped["c4"] != clients["c4"][:5]  # a draw, not the first five
    assert cap_examples(clients, 0, seed=1) == clients


# --- files with client_id ----------------------------------------------------------------


def test_jsonl_with_client_id(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"client_id": 2, "prompt": "Q1", "response": " A1"},
            {"client_id": 10, "prompt": "", "response": " A2"},
            {"client_id": 2, "prompt": "Q3", "response": " A3"},
        ],
    )
    clients = load_clients(str(path))
    assert list(clients) == ["10", "2"]
    assert clients["2"] == [Example("Q1", " A1"), Example("Q3", " A3")]
    assert clients["10"] == [Example("", " A2")]
    assert list(load_clients(str(path), min_examples=2)) == ["2"]


def test_json_array_text_with_client_id(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"client_id": "b", "text": "x"}, {"client_id": "a", "text": "y"}]))
    assert load_clients(str(path)) == {"a": [Example("", "y")], "b": [Example("", "x")]}


def _write_json(path: Path, rows: list[dict]) -> Path:
    """``rows`` as JSON Lines (``.jsonl``) or as one JSON array (``.json``)."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_columns_of_several_types_keep_each_cells_value(tmp_path: Path, suffix) -> None:
    """A column holding strings and numbers: the string "42" stays text, "007" and 7 stay two
    clients, and only the number in a text column is a bad row."""
    rows = [
        {"client_id": "007", "prompt": "a", "response": "x"},
        {"client_id": 7, "prompt": "b", "response": "y"},
        {"client_id": "u", "prompt": "c", "response": "42"},
        {"client_id": "u", "prompt": "d", "response": 5},
        {"client_id": "u", "prompt": "e", "response": "null"},
    ]
    path = _write_json(tmp_path / f"d{suffix}", rows)
    with pytest.raises(HetLoRAError, match="1 bad row of 5: row 4: column 'response' must be a "):
        load_clients(str(path))
    assert load_clients(str(path), on_bad_rows="skip") == {
        "007": [Example("a", "x")],
        "7": [Example("b", "y")],
        "u": [Example("c", "42"), Example("e", "null")],
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_single_json_column_of_several_types_is_one_bad_row(tmp_path: Path, suffix) -> None:
    rows = [{"text": "hello there"}, {"text": 5}, {"text": "general kenobi"}]
    path = _write_json(tmp_path / f"d{suffix}", rows)
    with pytest.raises(HetLoRAError, match="1 bad row of 3: row 2: column 'text' must be a"):
        load_clients(str(path), partitioner="iid", num_partitions=1)


def test_a_csv_with_a_leading_blank_line_or_a_long_field_reads(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    long = "x" * 200_000
    path.write_text(f"\nclient_id,prompt,response\n1,hi,ok\n1,{long},ok\n")
    assert load_clients(str(path)) == {"1": [Example("hi", "ok"), Example(long, "ok")]}


def test_csv_with_client_id(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('client_id,text\nu1,hello\nu2,"a, b"\nu1,world\n')
    assert load_clients(str(path)) == {
        "u1": [Example("", "hello"), Example("", "world")],
        "u2": [Example("", "a, b")],
    }


def test_parquet_with_client_id(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table = pa.table(
        {"client_id": [1, 1, 2], "prompt": ["p", "q", "r"], "response": ["x", "y", "z"]}
    )
    pq.write_table(table, path)
    clients = load_clients(str(path))
    assert clients == {"1": [Example("p", "x"), Example("q", "y")], "2": [Example("r", "z")]}


def test_alpaca_rows_read_as_prompt_and_response(tmp_path: Path) -> None:
    """Alpaca's instruction / input / output: the prompt is the instruction, the input where
    there is one (empty or null: none) and then the output, each after a blank line; without an
    input column too."""
    rows = [
        {"client_id": "a", "instruction": "Name a prime.", "input": "", "output": "7."},
        {"client_id": "a", "instruction": "Add them.", "input": "2 and 3", "output": "5."},
        {"client_id": "b", "instruction": "Say hi.", "input": None, "output": "Hi."},
    ]
    assert load_clients(str(write_jsonl(tmp_path / "a.jsonl", rows))) == {
        "a": [Example("Name a prime.\n\n", "7."), Example("Add them.\n\n2 and 3\n\n", "5.")],
        "b": [Example("Say hi.\n\n", "Hi.")],
    }
    for row in rows:
        del row["input"]
    path = tmp_path / "no-input.csv"
    path.write_text(
        "client_id,instruction,output\n"
        + "".join(f"{r['client_id']},{r['instruction']},{r['output']}\n" for r in rows)
    )
    assert load_clients(str(path))["a"][1] == Example("Add them.\n\n", "5.")
    rows[0]["output"], rows[1]["input"] = "", 3
    with pytest.raises(
        HetLoRAError,
        match=r"2 bad rows of 3: row 1: column 'output' is empty; "
        r"row 2: column 'input' must be a string",
    ):
        load_clients(str(write_jsonl(tmp_path / "bad.jsonl", rows)))


def test_csv_cells_are_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        "client_id,prompt,response\n"
        "007,Q1,42\n"
        "7,,NA\n"
        "0007,Q3,None\n"
        "1.10,Q4,null\n"
        "1.1,Q5,nan\n"
        "7,Q6,True\n"
    )
    assert load_clients(str(path)) == {
        "0007": [Example("Q3", "None")],
        "007": [Example("Q1", "42")],
        "1.1": [Example("Q5", "nan")],
        "1.10": [Example("Q4", "null")],
        "7": [Example("", "NA"), Example("Q6", "True")],
    }


@pytest.mark.parametrize("line", [2, 3])
def test_a_csv_row_with_more_fields_than_its_header_is_refused(tmp_path: Path, line) -> None:
    """An unquoted comma: on the first row pandas would shift the cells one column left (the
    extra field taken for an index) without a word; on any row it is one error naming it."""
    rows = ["1,Say bye,Bye", "2,Say hi,Hello, world"]
    path = tmp_path / "d.csv"
    path.write_text("client_id,prompt,response\n" + "\n".join(rows[::-1] if line == 2 else rows))
    with pytest.raises(HetLoRAError, match=f"line {line} has 4 fields, the header 3: quote"):
        load_clients(str(path))
    path.write_text('client_id,prompt,response\n1,Say hi,"Hello, world"\n')
    assert load_clients(str(path)) == {"1": [Example("Say hi", "Hello, world")]}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_file_that_is_not_utf8_is_refused_naming_the_line(tmp_path: Path, suffix) -> None:
    path = tmp_path / f"d{suffix}"
    good = '{"text": "abc"}\n' if suffix == ".jsonl" else "text\nabc\n"
    bad = '{"text": "caf\xe9"}\n' if suffix == ".jsonl" else "caf\xe9\n"
    path.write_bytes(good.encode() * 2 + bad.encode("latin-1"))
    line = 3 if suffix == ".jsonl" else 5
    with pytest.raises(HetLoRAError, match=f"line {line} is not UTF-8 \\(byte 0xe9\\)"):
        load_clients(str(path))


def test_csv_text_column_of_numbers_is_text(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("client_id,text\n10,3.50\n2,1e3\n10,-0\n")
    assert load_clients(str(path)) == {
        "10": [Example("", "3.50"), Example("", "-0")],
        "2": [Example("", "1e3")],
    }


def test_csv_missing_id_is_one_bad_row_and_the_others_keep_theirs(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("client_id,text\n1,a\n,b\n2,c\n1,d\n")
    with pytest.raises(HetLoRAError, match=r"1 bad row of 4: row 2: column 'client_id' is empty"):
        load_clients(str(path))
    assert load_clients(str(path), on_bad_rows="skip") == {
        "1": [Example("", "a"), Example("", "d")],
        "2": [Example("", "c")],
    }


def test_parquet_ids_as_written(tmp_path: Path) -> None:
    strings = tmp_path / "s.parquet"
    pq.write_table(pa.table({"client_id": ["007", "7", "0007"], "text": ["a", "b", "c"]}), strings)
    assert list(load_clients(str(strings))) == ["0007", "007", "7"]
    # an integer column with a missing id: the other ids stay integers, the row is bad
    ints = tmp_path / "i.parquet"
    pq.write_table(
        pa.table({"client_id": pa.array([12, None, 3], pa.int64()), "text": ["a", "b", "c"]}), ints
    )
    assert load_clients(str(ints), on_bad_rows="skip") == {
        "12": [Example("", "a")],
        "3": [Example("", "c")],
    }
    floats = tmp_path / "f.parquet"
    pq.write_table(pa.table({"client_id": [1.1, 1.10, 2.0], "text": ["a", "b", "c"]}), floats)
    pattern = (
        r"3 bad rows of 3: row 1: column 'client_id' must be a string or an integer, got "
        r"float 1\.1; row 2: .*; row 3: .*got float 2\.0"
    )
    with pytest.raises(HetLoRAError, match=pattern):
        load_clients(str(floats))


def test_parquet_text_column_keeps_its_type(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"client_id": ["a", "b"], "prompt": ["", "q"], "response": [4, 2]}), path
    )
    with pytest.raises(HetLoRAError, match="row 1: column 'response' must be a string, got int 4"):
        load_clients(str(path))


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("partitioner", "dirichlet", "partitioner = 'dirichlet'"),
        ("num_partitions", 3, "num_partitions = 3"),
        ("partition_by", "label", "partition_by = 'label'"),
        ("dirichlet_alpha", 0.1, "dirichlet_alpha = 0.1"),
    ],
)
def test_partitioner_keys_on_data_with_client_id_are_an_error(tmp_path, key, value, shown):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"client_id": f"u{i % 2}", "text": f"t{i}", "label": "x"} for i in range(6)],
    )
    with pytest.raises(HetLoRAError) as info:
        load_clients(str(path), **{key: value})
    assert str(info.value) == (
        f"{path} has a client_id column, so its rows are not partitioned: remove {shown}"
    )
    assert list(load_clients(str(path), partitioner="iid", num_partitions=10)) == ["u0", "u1"]


def test_a_missing_relative_file_path_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for source in ("mydata/train.jsonl", "mydata/train.CSV", "data/x.parquet", "a/b.json"):
        with pytest.raises(HetLoRAError, match=f"data file not found: {re.escape(source)}$"):
            load_clients(source)
    with pytest.raises(HetLoRAError, match="hub dataset id"):
        load_clients("owner/name")  # still a hub id (offline here)


# --- files without client_id: partitioning -----------------------------------------------


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_iid_partitioning(tmp_path: Path, suffix: str) -> None:
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(23)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "csv":
        path.write_text("prompt,response\n" + "".join(f"p{i},r{i}\n" for i in range(23)))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    clients = load_clients(str(path), partitioner="iid", num_partitions=4, seed=3)
    assert list(clients) == [f"partition-{i:03d}" for i in range(4)]
    assert sorted(len(v) for v in clients.values()) == [5, 6, 6, 6]
    all_examples = [ex for v in clients.values() for ex in v]
    assert sorted(all_examples, key=lambda e: int(e.prompt[1:])) == [
        Example(f"p{i}", f"r{i}") for i in range(23)
    ]
    # Seeded shuffle: same seed same clients, another seed other clients.
    assert load_clients(str(path), num_partitions=4, seed=3) == clients
    assert load_clients(str(path), num_partitions=4, seed=4) != clients


def test_dirichlet_partitioning(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", text_rows(200))
    kwargs = {"partitioner": "dirichlet", "num_partitions": 5, "partition_by": "label"}
    clients = load_clients(str(path), dirichlet_alpha=0.3, seed=1, **kwargs)
    assert set(clients) <= {f"partition-{i:03d}" for i in range(5)}
    assert sum(len(v) for v in clients.values()) == 200
    texts = sorted(ex.response for v in clients.values() for ex in v)
    assert texts == sorted(f"line {i}" for i in range(200))
    assert all(ex.prompt == "" for v in clients.values() for ex in v)
    assert load_clients(str(path), dirichlet_alpha=0.3, seed=1, **kwargs) == clients
    assert load_clients(str(path), dirichlet_alpha=0.3, seed=2, **kwargs) != clients
    # Small alpha gives skewed label mixes: some client is dominated by one label.
    label_of = {f"line {i}": i % 4 for i in range(200)}
    shares = []
    for v in clients.values():
        counts = [sum(label_of[e.response] == k for e in v) for k in range(4)]
        shares.append(max(counts) / len(v))
    assert max(shares) > 0.5


def test_many_partitions_sort(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", text_rows(1200))
    clients = load_clients(str(path), num_partitions=1100)
    assert list(clients)[:2] == ["partition-0000", "partition-0001"]
    assert list(clients) == sorted(clients)


# --- errors ------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HetLoRAError, match="data file not found: .*nope.jsonl"):
        load_clients(str(tmp_path / "nope.jsonl"))


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(HetLoRAError, match=r"unsupported data file type '\.txt'"):
        load_clients(str(path))


@pytest.mark.parametrize(
    ("name", "content"),
    [("d.jsonl", ""), ("d.jsonl", "\n\n  \n"), ("d.csv", ""), ("d.json", "")],
)
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(HetLoRAError, match=f"data file .*{name} is empty"):
        load_clients(str(path))


def test_no_rows(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("client_id,text\n")
    with pytest.raises(HetLoRAError, match="d.csv has no rows"):
        load_clients(str(csv))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), parquet)
    with pytest.raises(HetLoRAError, match="d.parquet has no rows"):
        load_clients(str(parquet))
    array = tmp_path / "d.json"
    array.write_text("[]")
    with pytest.raises(HetLoRAError, match="d.json"):
        load_clients(str(array))


def test_malformed_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("client_id,text\n1,not parquet\n")
    with pytest.raises(HetLoRAError, match=r"cannot read .*d.parquet as parquet: .+"):
        load_clients(str(path))


def test_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(HetLoRAError, match=r"cannot read .*d.jsonl as json: .+") as info:
        load_clients(str(path))
    assert "\n" not in str(info.value)


def test_missing_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"client_id": 1, "prompt": "a", "answer": "b"}])
    pattern = (
        r"needs columns \(messages\), \(conversations\), \(prompt, response\), \(instruction, "
        r"output\) or \(text\).*found: client_id, prompt, answer"
    )
    with pytest.raises(HetLoRAError, match=pattern):
        load_clients(str(path))


def test_null_value(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": None}])
    with pytest.raises(HetLoRAError, match="row 2: column 'text' is null"):
        load_clients(str(path), num_partitions=1)
    csv = tmp_path / "d.csv"
    csv.write_text("client_id,prompt,response\n1,,x\n2,q,\n")
    pattern = "d.csv: 1 bad row of 2: row 2: column 'response' is empty"
    with pytest.raises(HetLoRAError, match=pattern):
        load_clients(str(csv))
    assert load_clients(str(csv), on_bad_rows="skip") == {"1": [Example("", "x")]}


def test_non_string_value(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": 5}] * 3)
    with pytest.raises(HetLoRAError, match="row 1: column 'response' must be a string, got int"):
        load_clients(str(path), num_partitions=1)


def test_empty_response(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "  "}])
    with pytest.raises(HetLoRAError, match="row 2: column 'text' is empty"):
        load_clients(str(path), num_partitions=1)


def test_null_client_id(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"client_id": None, "text": "a"}])
    with pytest.raises(HetLoRAError, match="row 1: column 'client_id' is empty"):
        load_clients(str(path))


def _corpus_with_bad_rows(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """60 prompt/response rows of 3 clients; 8 of them bad in different ways (1-based rows)."""
    rows = [{"client_id": f"c{i % 3}", "prompt": f"Q{i}", "response": f" A{i}"} for i in range(60)]
    bad = {
        4: ("response", ""),
        9: ("response", "   "),
        17: ("response", None),
        23: ("prompt", None),
        31: ("response", 7),
        38: ("client_id", ""),
        45: ("client_id", None),
        52: ("response", ""),
    }
    reasons = {
        4: "column 'response' is empty",
        9: "column 'response' is empty",
        17: "column 'response' is null",
        23: "column 'prompt' is null",
        31: "column 'response' must be a string, got int 7",
        38: "column 'client_id' is empty",
        45: "column 'client_id' is empty",
        52: "column 'response' is empty",
    }
    for row, (column, value) in bad.items():
        rows[row - 1][column] = value
    # the int among strings makes datasets store the column as JSON text: still found
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, reasons


def test_every_bad_row_is_reported_at_once(tmp_path: Path) -> None:
    path, reasons = _corpus_with_bad_rows(tmp_path)
    with pytest.raises(HetLoRAError) as info:
        load_clients(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: 8 bad rows of 60: ")
    first = sorted(reasons)[:5]
    expected = "; ".join(f"row {r}: {reasons[r]}" for r in first)
    assert expected in message
    assert "; and 3 more" in message and 'on_bad_rows = "skip"' in message
    assert "row 38" not in message  # only the first five are listed


def test_bad_rows_skipped_with_one_warning_and_counted(tmp_path: Path, caplog) -> None:
    path, reasons = _corpus_with_bad_rows(tmp_path)
    report: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="hetlora.data.files"):
        clients = load_clients(str(path), on_bad_rows="skip", report=report)
    assert report == {"bad_rows_skipped": 8}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "8 bad rows of 60" in warnings[0].getMessage()
    kept = [ex.prompt for examples in clients.values() for ex in examples]
    assert len(kept) == 52
    assert sorted(kept, key=lambda q: int(q[1:])) == [
        f"Q{i}" for i in range(60) if i + 1 not in reasons
    ]
    assert clients["c0"][0] == Example("Q0", " A0")


def test_on_bad_rows_skip_with_nothing_usable_and_bad_values(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(HetLoRAError, match="no usable rows: 2 bad rows of 2"):
        load_clients(str(path), num_partitions=1, on_bad_rows="skip")
    with pytest.raises(HetLoRAError, match="on_bad_rows must be one of error, skip"):
        load_clients(str(path), on_bad_rows="warn")
    clean = write_jsonl(tmp_path / "clean.jsonl", text_rows(4))
    report: dict[str, int] = {}
    load_clients(str(clean), num_partitions=2, on_bad_rows="skip", report=report)
    assert report == {"bad_rows_skipped": 0}


def test_unknown_partitioner(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", text_rows(10))
    with pytest.raises(HetLoRAError, match="unknown partitioner 'pathological'.*iid, dirichlet"):
        load_clients(str(path), partitioner="pathological")


def test_dirichlet_needs_partition_by(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", text_rows(10))
    with pytest.raises(HetLoRAError, match="dirichlet partitioner needs partition_by.*text, label"):
        load_clients(str(path), partitioner="dirichlet", num_partitions=2)
    with pytest.raises(HetLoRAError, match="partition_by column 'topic' is not in .*d.jsonl"):
        load_clients(str(path), partitioner="dirichlet", num_partitions=2, partition_by="topic")


@pytest.mark.parametrize("num_partitions", [0, -3])
def test_num_partitions_too_small(tmp_path: Path, num_partitions: int) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", text_rows(10))
    with pytest.raises(
        HetLoRAError, match=f"num_partitions must be an integer >= 1, got {num_partitions}"
    ):
        load_clients(str(path), num_partitions=num_partitions)


def test_num_partitions_too_large(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", text_rows(10))
    with pytest.raises(HetLoRAError, match="num_partitions=11 is larger than the 10 rows of"):
        load_clients(str(path), num_partitions=11)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"min_examples": 0}, "min_examples must be an integer >= 1, got 0"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha must be a finite number > 0, got 0.0"),
        ({"dirichlet_alpha": float("inf")}, "dirichlet_alpha must be a finite number > 0"),
    ],
)
def test_bad_parameters(kwargs: dict, pattern: str) -> None:
    with pytest.raises(HetLoRAError, match=pattern):
        load_clients("shakespeare", **kwargs)


def test_no_partition_left(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", text_rows(10))
    with pytest.raises(
        HetLoRAError, match=r"no client of .*d.jsonl.*\(5 clients before the filter\)"
    ):
        load_clients(str(path), num_partitions=5, min_examples=3)


def test_nothing_written_to_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", cache / "modules")
    path = write_jsonl(tmp_path / "d.jsonl", text_rows(10))
    assert len(load_clients(str(path), num_partitions=2)) == 2
    assert not cache.exists() or not any(cache.rglob("*"))
