"""`hetlora export --gguf` against llama.cpp itself: ``make llamacpp-check``.

Writes the tiny Llama as a GGUF file (F32, llama.cpp's layout: `tiny.make_tiny_gguf`), trains a
short HetLoRA run on it, exports the global adapter at one rank twice (PEFT and ``--gguf``), and
compares the next-token probabilities of a text after every token: PEFT's (the adapter on the
de-quantised base, in PyTorch) against llama.cpp's (the GGUF base with ``adapter.gguf``, run by
the prebuilt llama.cpp of ``node-llama-cpp``, tools/llamacpp/). The adapter's own effect (PEFT
with against without it) is printed beside, so that agreement means more than two unchanged
bases. ``--packaged`` does the same on the packaged SmolLM2-135M-Instruct and its Q4_1 file,
where llama.cpp's quantised matmuls differ from PyTorch's de-quantised ones: it reports the
mean next-token NLL of one character's speeches in both, with and without the adapter. Needs Node.js and
``npm install`` in tools/llamacpp (the make target does both).

    python tools/llamacpp_check.py [--work DIR] [--rank R] [--packaged]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be: that is the question. Whether 'tis nobler in the mind to suffer"
#: the packaged model's run: a short one whose adapter moves the probabilities visibly
PACKAGED_RUN = {
    "rounds": "2",
    "clients_per_round": "2",
    "local_steps": "4",
    "batch_size": "4",
    "lr": "0.01",
    "eval_examples": "8",
    "rouge_examples": "0",
    "precision": "'fp32'",
    "compile": "'off'",
}
RUN = {
    "rounds": "3",
    "clients_per_round": "4",
    "local_steps": "4",
    "batch_size": "4",
    "lr": "0.05",
    "eval_examples": "8",
    "rouge_examples": "0",
    "min_examples": "150",
    "r_min": "2",
    "r_max": "8",
    "precision": "'fp32'",
    "compile": "'off'",
    # every projection of a Llama block: the query's and key's (GQA) rows llama.cpp reorders
    "target_modules": "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']",
}


def llamacpp_probs(
    model: Path, lora: Path | None, ids: list[int], out: Path, mode: str
) -> list[dict]:
    script = ROOT / "tools" / "llamacpp" / "probs.mjs"
    lora_arg = str(lora) if lora else "-"
    argv = ["node", str(script), str(model), lora_arg, json.dumps(ids), str(out), mode]
    subprocess.run(argv, check=True, cwd=script.parent, capture_output=True, text=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the files (default: a temp one)")
    parser.add_argument("--rank", type=int, default=5, help="the exported tier's rank")
    parser.add_argument(
        "--packaged", action="store_true", help="the packaged model and its Q4_1 file instead"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llamacpp-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HETLORA_CACHE", str(work / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tools"))
    import numpy as np
    import torch
    from peft import PeftModel
    from tiny import make_tiny_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hetlora.cli import main as cli
    from hetlora.models import resolve_model
    from hetlora.provenance import collect

    def hetlora(*argv: str) -> None:
        sys.argv = ["hetlora", *argv]
        try:
            cli()
        except SystemExit as done:
            if done.code:
                raise

    if args.packaged:
        from hetlora.models import DEFAULT_MODEL, packaged_gguf

        base, model_key, settings = packaged_gguf(), DEFAULT_MODEL, PACKAGED_RUN
    else:
        base = make_tiny_gguf(work / "gguf")
        model_key, settings = str(base), RUN
    run = work / "run"
    sets = [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]
    hetlora("run", "--out", str(run), "--overwrite", "--set", f"model='{model_key}'", *sets)
    original = [] if args.packaged else ["--base-model", str(work / "gguf" / "hf")]
    for out, extra in ((work / "peft", original), (work / "llamacpp", ["--gguf"])):
        if out.exists():
            shutil.rmtree(out)
        hetlora("export", str(run), "--rank", str(args.rank), "--out", str(out), *extra)

    folder = resolve_model(model_key)
    text = TEXT
    if args.packaged:  # one character's speeches (the last by name), about 400 tokens
        from hetlora.data.shakespeare import load_shakespeare

        clients = load_shakespeare()
        last = sorted(clients)[-1]
        text = " ".join(ex.prompt + ex.response for ex in clients[last])[:1500]
    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        plain = torch.softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
        peft = PeftModel.from_pretrained(model, str(work / "peft"))
        adapted = torch.softmax(peft(torch.tensor([ids])).logits[0], -1).numpy()
    lora = work / "llamacpp" / "adapter.gguf"
    following = np.array(ids[1:])
    at = np.arange(len(following))
    result: dict = {"model": model_key, "tokens": len(ids), "rank": args.rank}
    if args.packaged:  # a 49k vocabulary: per position the text's next token and the top one
        runs = [
            llamacpp_probs(base, x, ids, work / f"{i}.json", "next")
            for i, x in ((0, None), (1, lora))
        ]
        ours = {
            k: (np.array([r["next"] for r in rows[:-1]]), np.array([r["top"] for r in rows]))
            for k, rows in zip(("base", "adapted"), runs, strict=True)
        }
    else:

        def dense(rows: list[dict]) -> np.ndarray:
            out = np.zeros_like(adapted)
            for i, row in enumerate(rows):
                for token, p in row.items():
                    out[i, int(token)] = p
            return out

        without = dense(llamacpp_probs(base, None, ids, work / "b.json", "full"))
        with_lora = dense(llamacpp_probs(base, lora, ids, work / "a.json", "full"))
        result |= {
            "llamacpp_lora_vs_peft": float(np.abs(with_lora - adapted).max()),
            "llamacpp_base_vs_pytorch_base": float(np.abs(without - plain).max()),
            "adapter_effect_peft": float(np.abs(adapted - plain).max()),
            "adapter_effect_llamacpp": float(np.abs(with_lora - without).max()),
        }
        ours = {
            k: (p[at, following], p.argmax(1))
            for k, p in (("base", without), ("adapted", with_lora))
        }
    theirs = {
        k: (p[at, following], p.argmax(1)) for k, p in (("base", plain), ("adapted", adapted))
    }

    def nll(next_probs: np.ndarray) -> float:  # mean NLL of the text's next tokens
        return float(-np.log(np.maximum(next_probs, 1e-30)).mean())

    effect_ours = np.log(np.maximum(ours["adapted"][0], 1e-30) / np.maximum(ours["base"][0], 1e-30))
    effect_theirs = np.log(theirs["adapted"][0] / theirs["base"][0])
    result |= {
        "nll_pytorch_base_adapted": [nll(theirs["base"][0]), nll(theirs["adapted"][0])],
        "nll_llamacpp_base_adapted": [nll(ours["base"][0]), nll(ours["adapted"][0])],
        "top1_agreement_base_adapted": [
            float((ours[k][1] == theirs[k][1]).mean()) for k in ("base", "adapted")
        ],
        # per position, the adapter's change of log p(next token) in the two runtimes
        "effect_correlation": float(np.corrcoef(effect_ours, effect_theirs)[0, 1]),
        "node_llama_cpp": json.loads(
            (
                ROOT / "tools" / "llamacpp" / "node_modules" / "node-llama-cpp" / "package.json"
            ).read_text()
        )["version"],
        "provenance": collect(bf16=False),
    }
    print(json.dumps(result, indent=2))
    if args.packaged:  # quantised matmuls: the two effects must agree, not the numbers
        ok = result["effect_correlation"] > 0.9
        print("agree" if ok else "DISAGREE: the adapter's effects correlate below 0.9")
    else:
        ok = result["llamacpp_lora_vs_peft"] < 1e-4 < result["adapter_effect_peft"]
        print("agree" if ok else "DISAGREE: llama.cpp and PEFT differ by more than 1e-4")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
