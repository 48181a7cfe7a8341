"""A tiny Llama built at test time: SentencePiece BPE tokenizer (vocab 256) + random weights, < 1 MB, < 1 s.

No real language model small enough for tests exists offline, and none is needed: the tests check plumbing
(tokenisation, truncation, training steps, beam search, resumable output), not the quality of the titles.
"""

from __future__ import annotations

import io
from pathlib import Path

from gloss_cli.prompt import PROMPT_TEMPLATE

VOCAB = 256


def _corpus(titles: list[str]) -> list[str]:
    lines = [line for line in PROMPT_TEMPLATE.splitlines() if line.strip()]
    lines += [f"Title: {t}" for t in titles]
    lines += [f"Title: w{i}_{k} w{k}_{i}" for i in range(60) for k in range(30)]  # the synthetic dataset's words
    return lines


def _tokenizer(titles: list[str]) -> object:
    """A Llama tokenizer from a SentencePiece BPE model, converted without protobuf (pieces and merges)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(titles)),
        model_writer=proto,
        vocab_size=VOCAB,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],  # prompts are line-based; the newline must survive
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid):
            continue
        ranked += [(pid, piece[:k], piece[k:]) for k in range(1, len(piece)) if {piece[:k], piece[k:]} <= vocab.keys()]
    merges = [(left, right) for _, left, right in sorted(ranked)]  # SentencePiece BPE: lower id = earlier merge
    return LlamaTokenizer(vocab=vocab, merges=merges)


def build_tiny_llama(folder: Path, titles: list[str] | None = None, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM + tokenizer (safetensors) into ``folder``; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(titles or [])
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder
