"""`hetlora export --gguf` against llama.cpp itself: ``make llamacpp-check``.

Writes the tiny Llama as a GGUF file (F32, llama.cpp's layout: `tiny.make_tiny_gguf`), trains a
short HetLoRA run on it, exports the global adapter at one rank twice (PEFT and ``--gguf``), and
compares the next-token probabilities of a text after every token: PEFT's (the adapter on the
de-quantised base, in PyTorch) against llama.cpp's (the GGUF base with ``adapter.gguf``, run by
the prebuilt llama.cpp of ``node-llama-cpp``, tools/llamacpp/). The adapter's own effect (PEFT
with against without it) is printed beside, so that agreement means more than two unchanged
bases. Needs Node.js and ``npm install`` in tools/llamacpp (the make target does both).

    python tools/llamacpp_check.py [--work DIR] [--rank R]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be: that is the question. Whether 'tis nobler in the mind to suffer"
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
}


def llamacpp_probs(model: Path, lora: Path | None, ids: list[int], out: Path) -> list[dict]:
    script = ROOT / "tools" / "llamacpp" / "probs.mjs"
    argv = ["node", str(script), str(model), str(lora) if lora else "-", json.dumps(ids), str(out)]
    subprocess.run(argv, check=True, cwd=script.parent, capture_output=True, text=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the files (default: a temp one)")
    parser.add_argument("--rank", type=int, default=5, help="the exported tier's rank")
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

    base = make_tiny_gguf(work / "gguf")
    run = work / "run"
    sets = [x for k, v in RUN.items() for x in ("--set", f"{k}={v}")]
    hetlora("run", "--out", str(run), "--overwrite", "--set", f"model='{base}'", *sets)
    for out, extra in ((work / "peft", []), (work / "llamacpp", ["--gguf"])):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        hetlora("export", str(run), "--rank", str(args.rank), "--out", str(out), *extra)

    folder = resolve_model(str(base))
    ids = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        plain = torch.softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
        peft = PeftModel.from_pretrained(model, str(work / "peft"))
        adapted = torch.softmax(peft(torch.tensor([ids])).logits[0], -1).numpy()

    def dense(rows: list[dict]) -> np.ndarray:
        out = np.zeros_like(adapted)
        for i, row in enumerate(rows):
            for token, p in row.items():
                out[i, int(token)] = p
        return out

    with_lora = dense(
        llamacpp_probs(base, work / "llamacpp" / "adapter.gguf", ids, work / "a.json")
    )
    without = dense(llamacpp_probs(base, None, ids, work / "b.json"))
    result = {
        "tokens": len(ids),
        "rank": args.rank,
        "llamacpp_lora_vs_peft": float(np.abs(with_lora - adapted).max()),
        "llamacpp_base_vs_pytorch_base": float(np.abs(without - plain).max()),
        "adapter_effect_peft": float(np.abs(adapted - plain).max()),
        "adapter_effect_llamacpp": float(np.abs(with_lora - without).max()),
        "node_llama_cpp": json.loads(
            (
                ROOT / "tools" / "llamacpp" / "node_modules" / "node-llama-cpp" / "package.json"
            ).read_text()
        )["version"],
        "provenance": collect(bf16=False),
    }
    print(json.dumps(result, indent=2))
    ok = result["llamacpp_lora_vs_peft"] < 1e-4 < result["adapter_effect_peft"]
    print("agree" if ok else "DISAGREE: llama.cpp and PEFT differ by more than 1e-4")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
