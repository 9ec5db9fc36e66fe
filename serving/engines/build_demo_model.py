"""Build the tiny demo chat model. Runs with the *engine* environment's Python, never the gateway's.

A Llama architecture with seeded random weights (hidden 128, 2 heads → head_dim 64, which the
vLLM CPU attention kernel accepts), a byte-level BPE tokenizer trained locally on text that ships
with Python (the standard library's docstrings), and a ChatML chat template. The same seed and
the same Python give byte-identical files. Progress goes to stdout as JSON lines:
``{"step": i, "of": n, "what": "..."}``.

Usage: python build_demo_model.py OUTPUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

STEPS = ("collect corpus", "train tokenizer", "initialise weights", "write model", "checksum")
CORPUS_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "gzip", "hashlib", "heapq", "hmac", "http.client", "http.server", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "math", "os", "pathlib", "pickle",
    "queue", "random", "re", "secrets", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "typing", "unittest",
    "urllib.parse", "uuid", "zipfile",
)
# ChatML, rendering every field a chat request can carry (tools and their schemas, documents,
# names, reasoning, tool calls and their ids), as the templates of larger models do: the tests
# read the engine's prompt back to see that each one arrives redacted.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n' + (tools | tojson) + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% if documents %}{{ '<|im_start|>system\n# Documents\n' }}"
    "{% for doc in documents %}{{ (doc | tojson) + '\n' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] }}"
    "{% if message.get('name') %}{{ ' ' + message['name'] }}{% endif %}{{ '\n' }}"
    "{% if message.get('reasoning') %}{{ '<think>' + message['reasoning'] + '</think>\n' }}"
    "{% endif %}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% set arguments = call['function']['arguments'] %}"
    "{{ '\n<tool_call>' + call['id'] + ' ' + call['function']['name'] + ' '"
    " + (arguments if arguments is string else arguments | tojson) + '</tool_call>' }}"
    "{% endfor %}"
    "{% if message.get('tool_call_id') %}{{ '\n[' + message['tool_call_id'] + ']' }}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 4096


def progress(step: int, what: str) -> None:
    print(json.dumps({"step": step, "of": len(STEPS), "what": what}), flush=True)


def collect_corpus() -> list[str]:
    texts: list[str] = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc:
                texts.append(doc)
        if module.__doc__:
            texts.append(module.__doc__)
    return texts


def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(out)


def build_weights(out: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    progress(3, "initialise weights")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    progress(4, "write model")
    model.save_pretrained(out, safe_serialization=True)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def checksums(out: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(out.iterdir()):
        if path.is_file() and path.name != "SHA256SUMS.json":
            sums[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "SHA256SUMS.json").write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")
    return sums


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    progress(1, "collect corpus")
    texts = collect_corpus()
    progress(2, "train tokenizer")
    train_tokenizer(texts, out)
    build_weights(out, args.seed)
    progress(5, "checksum")
    sums = checksums(out)
    print(json.dumps({"done": str(out), "files": sums}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
