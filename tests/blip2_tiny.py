"""Tiny random BLIP-2 models (OPT and Flan-T5 style) and matching processors, built offline."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

HIDDEN = 32
QUERY_TOKENS = 4
WORDS = ["a", "photo", "of", "question", "answer", "what", "colour", "is", "the", "cube", "red",
         "green", "blue", "on", "single", "block", ":", "?"]
# Special tokens in each family's own order: OPT (GPT-2 BPE) has bos = eos = "</s>" prepended;
# T5 has pad = decoder start = 0 and appends "</s>".
SPECIALS = {"opt": ["<s>", "<pad>", "</s>", "<unk>", "<image>"],
            "t5": ["<pad>", "</s>", "<unk>", "<image>"]}


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A lower-casing WordLevel tokenizer over WORDS with the family's special tokens."""
    vocab = {w: i for i, w in enumerate(SPECIALS[family] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "Answer:" -> "answer", ":"
    eos = vocab["</s>"]
    template = ("</s> $A", [("</s>", eos)]) if family == "opt" else ("$A </s>", [("</s>", eos)])
    tok.post_processor = processors.TemplateProcessing(single=template[0],
                                                       special_tokens=template[1])
    tok.add_special_tokens(SPECIALS[family])  # never split, never lower-cased
    kw = dict(bos_token="</s>") if family == "opt" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", **kw)


def tiny_processor(family: str) -> Blip2Processor:
    """Blip2Processor (32 px images, QUERY_TOKENS image tokens) around tiny_tokenizer."""
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    return Blip2Processor(images, tiny_tokenizer(family), num_query_tokens=QUERY_TOKENS)


def tiny_blip2_config(family: str, tokenizer: PreTrainedTokenizerFast) -> Blip2Config:
    """BLIP-2 with init scale ≈ 1/sqrt(hidden) (vision's default 1e-10 is ~zero), no dropout.

    T5 keeps its own init (already ∝ 1/sqrt(d_model)); dropout is off so train() is deterministic.
    """
    init = HIDDEN**-0.5
    vocab = len(tokenizer)  # generated ids must all decode
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "opt":
        text = OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN,
                         ffn_dim=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64, init_std=init, dropout=0.0,
                         attention_dropout=0.0,
                         bos_token_id=tokenizer.bos_token_id, **ids)
    else:  # Flan-T5: gated-gelu FFN (wi_0, wi_1), untied LM head
        text = T5Config(vocab_size=vocab, d_model=HIDDEN, d_kv=16, d_ff=2 * HIDDEN, num_layers=1,
                        num_decoder_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                        dropout_rate=0.0,
                        tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id,
                        **ids)
    vision = dict(hidden_size=HIDDEN + 16, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8, initializer_range=init)
    qformer = dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=2 * HIDDEN, cross_attention_frequency=1,
                   initializer_range=init, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=QUERY_TOKENS, initializer_range=init,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"))


def tiny_blip2(family: str, seed: int = 0) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A seeded tiny BLIP-2 ("opt" or "t5") in eval mode, and its processor."""
    processor = tiny_processor(family)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(tiny_blip2_config(family, processor.tokenizer)).eval()
    with torch.no_grad():  # query tokens init to zeros: Q-Former adapters would get no gradient
        model.query_tokens.normal_(0.0, HIDDEN**-0.5)
    return model, processor
