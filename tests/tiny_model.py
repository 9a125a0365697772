"""Build a tiny random-weight Llama that real vLLM can serve, with no download.

    .venv-vllm/bin/python tests/tiny_model.py OUT_DIR [--seed 0]

Writes into OUT_DIR: a 2-layer Llama (hidden 256, random weights, float32 safetensors, about
6 MB), a byte-level BPE tokenizer trained with the `tokenizers` library on a text this script
writes (about 1,000 tokens; byte-level, so any input encodes), and a chat template. Needs torch,
transformers and tokenizers: run it with the vLLM environment's Python (tests/vllm_env.sh).
Skips the build when OUT_DIR already holds a model built by the same recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

RECIPE = 1
VOCAB_SIZE = 1024
MAX_POSITIONS = 2048
SERVED_NAME = "tiny-llama"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

_WORDS = (
    "the a an of to in and is for on with that by as at from this be are it or was which "
    "model server token tokens request requests latency throughput batch queue cache memory "
    "gpu gpus cpu core cores switch link bandwidth time first output input prompt stream "
    "user users load test measure report percentile mean median tail slow fast quick brown "
    "fox jumps over lazy dog hello world question answer explain write python sort what "
    "nvlink quantum computing chat assistant system message reply seconds milliseconds"
).split()


def corpus_text(n_sentences: int = 4000, seed: int = 0) -> str:
    """A deterministic English-like text (plus digits and punctuation) to train the BPE on."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10000)))
        s = " ".join(words)
        lines.append(s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!", ","]))
    return "\n".join(lines) + "\n"


def build(out_dir: str, seed: int = 0) -> str:
    stamp_path = os.path.join(out_dir, "tiny_model.json")
    want = {"recipe": RECIPE, "seed": seed}
    if os.path.isfile(stamp_path) and os.path.isfile(os.path.join(out_dir, "config.json")):
        try:
            with open(stamp_path) as f:
                if json.load(f) == want:
                    return out_dir
        except (OSError, ValueError):
            pass

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    text_path = os.path.join(out_dir, "tokenizer_corpus.txt")
    with open(text_path, "w") as f:
        f.write(corpus_text(seed=seed))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([text_path], trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|pad|>", unk_token="<|unk|>", model_max_length=MAX_POSITIONS,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    model.generation_config.bos_token_id = hf_tok.bos_token_id
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(stamp_path, "w") as f:
        json.dump(want, f)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    build(args.out_dir, args.seed)
    print(f"tiny model in {args.out_dir} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
