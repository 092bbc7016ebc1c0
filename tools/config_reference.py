"""Write docs/configuration.md from the config keys' own descriptions (``Config`` field docs and
``KEY_RULES``), the one source of each key's meaning: ``python tools/config_reference.py``.
``tests/test_config_rules.py`` fails when the committed page differs from what this writes."""

from __future__ import annotations

from pathlib import Path

from hetlora.config import reference_markdown, rules_markdown

HEADER = """# Configuration reference

Every key of a run, its default and its meaning, generated from the `Config` class
(`src/hetlora/config.py`) by `tools/config_reference.py`; do not edit by hand.

Set keys in a TOML file (`hetlora run --config my.toml`) or one at a time with `--set key=value`
(values are TOML: `--set lr=2e-3`, `--set target_modules="['q_proj','v_proj']"`). From Python:
`hetlora.run(rounds=5, lr=2e-3)` or `hetlora.make_config({...})`. `hetlora defaults` prints all
keys with these descriptions as a TOML file to start from. An unknown key, a value of the wrong
type or outside its range, and a key set away from its default where it does not apply (the
last table) stop with one `error:` line and exit code 2.

"""

RULES = """
## Keys that apply only somewhere

Any value other than the default is an error where a key does not apply:

"""

FOOTER = """
## Device tiers

Instead of a uniform draw of each client's rank, a non-empty `tiers` list deals clients to
named tiers by share:

```toml
tiers = [
  { name = "phone", rank = 4, share = 0.6 },
  { name = "tablet", rank = 8, share = 0.3 },
  { name = "laptop", rank = 16, share = 0.1 },
]
```

## Older keys, and comparison files

Older keys still load, with a warning, so that `--resume` and `hetlora evaluate` work on older
runs: `rank_distribution` (a non-empty `tiers` list now says `"tiers"`) and
`data_size_factor = true` (now `aggregation = "sparsity_data_size"`). A run's own `config.toml`
that holds a key where it does not apply (older versions wrote `r_min` and `r_max` for
`full_ft`) loads with a warning naming the key, which did nothing in that run. In a comparison
file a top-level key is shared by the entries it applies to (`r_max = 50` at the top is every
LoRA entry's, not full FT's); an entry's own key must apply to it.
"""


def page() -> str:
    """The whole page."""
    return HEADER + reference_markdown() + RULES + rules_markdown() + FOOTER


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    out.write_text(page())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
