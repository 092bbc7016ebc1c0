"""Write the packaged Shakespeare dialogue as conversational data: ``client_id`` + ``messages``.

One client per (play, character), as the built-in data set; every conversation is a system turn
naming the character, then ``--turns`` exchanges in play order: the previous speech (with its
speaker's name) as the user turn and the character's reply as the assistant turn. With
``--save-to-disk FOLDER`` the same rows are also written by ``Dataset.save_to_disk``.

    .venv/bin/python scripts/shakespeare_chat.py --out runs/chat.jsonl --clients 8 \
        [--save-to-disk runs/chat_ds]
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

from hetlora.data import load_clients


def play_title(slug: str) -> str:
    """``a-winter-s-tale`` -> ``A Winter's Tale`` (the slugs drop apostrophes as hyphens)."""
    words = slug.split("-")
    out: list[str] = []
    for word in words:
        if word == "s" and out:
            out[-1] += "'s"
        else:
            out.append(word)
    small = {"and", "of", "the", "in"}  # lower case inside a title
    return " ".join(w if i and w in small else w[:1].upper() + w[1:] for i, w in enumerate(out))


def conversations(clients: int, turns: int, min_examples: int) -> list[dict]:
    """The rows: ``clients`` clients (the first in sorted order with enough examples)."""
    data = load_clients("shakespeare", min_examples=min_examples)
    rows = []
    for cid in sorted(data)[:clients]:
        play, character = cid.split("/", 1)
        examples = data[cid]
        for start in range(0, len(examples) - turns + 1, turns):
            messages = [
                {
                    "role": "system",
                    "content": f"You are {string.capwords(character.lower())} in "
                    f"{play_title(play)}. "
                    "Answer in character.",
                }
            ]
            for ex in examples[start : start + turns]:
                messages.append({"role": "user", "content": ex.prompt.rsplit("\n", 1)[0]})
                messages.append({"role": "assistant", "content": ex.response.strip()})
            rows.append({"client_id": cid, "messages": messages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument(
        "--clients", type=int, default=8, help="how many characters, one client each (default 8)"
    )
    parser.add_argument(
        "--turns", type=int, default=2, help="exchanges per conversation (default 2)"
    )
    parser.add_argument(
        "--min-examples",
        type=int,
        default=80,
        help="only characters with at least this many speeches (default 80)",
    )
    parser.add_argument(
        "--save-to-disk",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="also write the rows with Dataset.save_to_disk to this folder",
    )
    args = parser.parse_args()
    rows = conversations(args.clients, args.turns, args.min_examples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} conversations of {args.clients} clients to {args.out}")
    if args.save_to_disk:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(args.save_to_disk))
        print(f"saved the same rows with Dataset.save_to_disk to {args.save_to_disk}")


if __name__ == "__main__":
    main()
