"""Tiny Llama-style causal LMs and byte-level text from Python's own ``json`` package (no downloads)."""

from __future__ import annotations

import json
import os

import torch


def json_text_dataset(seq_len: int = 32, limit: int = 256) -> list[dict]:
    src = os.path.dirname(json.__file__)
    data = b"".join(open(os.path.join(src, f), "rb").read() for f in sorted(os.listdir(src)) if f.endswith(".py"))
    ids = torch.tensor(list(data), dtype=torch.long)
    n = min(limit, len(ids) // seq_len)
    return [{"input_ids": ids[i * seq_len:(i + 1) * seq_len], "labels": ids[i * seq_len:(i + 1) * seq_len]}
            for i in range(n)]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def training_args(output_dir: str, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=output_dir, per_device_train_batch_size=8, max_steps=20, logging_steps=5,
                learning_rate=3e-3, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)
