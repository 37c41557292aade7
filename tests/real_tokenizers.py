"""The real tokenizer types and real-shaped tiny checkpoints of each family, built offline.

Tokenizers are trained with ``tokenizers`` on CORPUS (cube captions and questions like the
shipped data, shape captions, everyday captions) in well under a second, once per process:

* BLIP: BERT WordPiece, uncased, in bert-base-uncased's layout: [PAD]=0, [unused0-98],
  [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, the learned words, [unused] filler up to 30521,
  then [DEC]=30522 and [ENC]=30523, loaded as BLIP's checkpoints load it
  (``BertTokenizer(bos_token="[DEC]", additional_special_tokens=["[ENC]"])``): bos is not [CLS].
* BLIP-2 OPT: byte-level BPE (GPT-2 style, ``Ġred`` after a space): <s>=0, <pad>=1, </s>=2,
  <unk>=3, "</s>" prepended as bos, <image> last.
* BLIP-2 Flan-T5: Unigram over a Metaspace pre-tokenizer (SentencePiece style, ``▁red``):
  <pad>=0, </s>=1, <unk>=2, "</s>" appended, <image> last.

Checkpoints use the real config classes with those special-token ids (BLIP: bos = [DEC],
sep = 102, pad = 0; BLIP-2: ``image_token_index`` = <image>, ``num_query_tokens`` 32), shrunk
in width, depth and image size (32 px). ``write_real_checkpoint(dir, family)`` saves one with
its processor, ready for ``train.py --model DIR``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
)

from data.scenes import COLOURS, RELATIONS, SHAPES, STACK_PAIRS, cube_caption, shape_caption

FAMILIES = ("blip-caption", "blip-vqa", "blip2-opt", "blip2-t5")
HIDDEN = 32
IMAGE_SIZE = 32
QUERY_TOKENS = 32  # as in every Salesforce BLIP-2 checkpoint
BERT_VOCAB = 30524  # bert-base-uncased's 30522 + [DEC] + [ENC]
EVERYDAY = [
    "a man riding a horse on a sandy beach", "two dogs playing in the snow",
    "a plate of food with broccoli and rice", "a red double decker bus on a city street",
    "a cat sleeping on a wooden bench", "a woman holding an umbrella in the rain",
    "a group of people standing around a kitchen", "a close up of a pizza on a table",
    "a train traveling down the tracks next to a forest", "a bowl of fruit on a counter",
    "a young boy throwing a frisbee in a park", "an airplane flying over a large city",
    "a bathroom with a white sink and a mirror", "a giraffe standing next to a tall tree",
    "a laptop computer sitting on top of a desk", "a street sign on the corner of a road",
    "a surfer riding a wave in the ocean", "two zebras grazing in a field of grass",
    "a clock tower in the middle of a town", "a small boat in a blue lake",
    "A brown teddy bear sitting on a bed.", "Three elephants walking through the water.",
    "A child eating a slice of cake.", "A bicycle leaning against a brick wall.",
]
QUESTIONS = (["how many cubes are there?", "what colour is the cube?",
              "what colour is the top cube?", "what colour is the bottom cube?"]
             + [f"is there a {c} cube?" for c in COLOURS])
ANSWERS = ["zero", "one", "two", "yes", "no", *COLOURS]
PROMPTS = ["a picture of", "a photo of", "a photo:"]


def corpus() -> list[str]:
    """A few hundred training sentences: captions, questions, "Question: .. Answer: .." lines."""
    stacks = [(), *((c,) for c in COLOURS), *STACK_PAIRS]
    captions = [cube_caption(s) for s in stacks]
    shapes = [shape_caption([(s, c)], None) for s, c in itertools.product(SHAPES, COLOURS)]
    shapes += [shape_caption([(SHAPES[i % 3], a), (SHAPES[(i + 1) % 3], b)], rel)
               for i, ((a, b), rel) in enumerate(itertools.product(STACK_PAIRS, RELATIONS))]
    qa = [f"Question: {q} Answer: {a}" for q, a in zip(itertools.cycle(QUESTIONS), ANSWERS * 4)]
    prompted = [f"{p} {c}" for p, c in zip(itertools.cycle(PROMPTS), captions + EVERYDAY)]
    return captions + shapes + QUESTIONS + qa + EVERYDAY + prompted


def _alphabet(cased: bool) -> list[str]:
    """Every character tests type, so no test text becomes <unk>."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return list(letters + (letters.upper() if cased else "") + "0123456789.,:;?!'-\"()")


@functools.cache
def _bert_words() -> tuple[str, ...]:
    """Learned WordPiece vocabulary (words and ##pieces), specials excluded, in id order."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=500, initial_alphabet=_alphabet(False),
                                        special_tokens=[], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tuple(sorted(tok.get_vocab(), key=tok.get_vocab().get))


def bert_tokenizer() -> BertTokenizer:
    """BLIP's tokenizer: bert-base-uncased's id layout, bos [DEC] (30522) distinct from [CLS]."""
    head = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    filler = BERT_VOCAB - 2 - len(head) - len(_bert_words())
    tokens = [*head, *_bert_words(), *(f"[unused{99 + i}]" for i in range(filler)), "[DEC]",
              "[ENC]"]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, bos_token="[DEC]",
                         additional_special_tokens=["[ENC]"])


def _byte_level_bpe() -> Tokenizer:
    """OPT's kind: GPT-2 byte-level BPE, no prefix space (a word after a space is ``Ġword``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def _unigram() -> Tokenizer:
    """T5's kind: a Unigram model over Metaspace words (``▁red``), SentencePiece style.

    On a corpus this small, ``tokenizers``' UnigramTrainer keeps almost no whole words ("red"
    becomes "▁", "re", "d"), so the pieces come from a BPE trained over the same Metaspace
    words, each scored by its log frequency in that BPE's segmentation of the corpus (the
    M-step of Unigram's EM); Viterbi then picks whole words where the corpus had them.
    """
    specials = ["<pad>", "</s>", "<unk>"]
    metaspace = pre_tokenizers.Metaspace(prepend_scheme="always")
    seed = Tokenizer(models.BPE(unk_token="<unk>"))
    seed.pre_tokenizer = metaspace
    seed.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=_alphabet(True),
        show_progress=False))
    counts = Counter(t for s in corpus() for t in seed.encode(s, add_special_tokens=False).tokens)
    total = sum(counts.values())
    pieces = sorted(seed.get_vocab(), key=seed.get_vocab().get)
    scores = [(p, 0.0 if p in specials else math.log(max(counts[p], 0.5) / total))
              for p in pieces]
    tok = Tokenizer(models.Unigram(scores, unk_id=specials.index("<unk>")))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    return tok


@functools.cache
def _trained_json(family: str) -> str:
    """The trained BLIP-2 language tokenizer ("opt" or "t5") with its template, as JSON."""
    tok = _byte_level_bpe() if family == "opt" else _unigram()
    # OPT prepends </s> as bos; T5 appends </s> as eos.
    template = "</s> $A" if family == "opt" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tok.add_special_tokens(["<image>"])  # BLIP-2's image placeholder, after the vocabulary
    return tok.to_str()


def blip2_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """OPT's byte-level BPE (bos = eos = </s>, prepended) or T5's Unigram (</s> appended)."""
    tok = Tokenizer.from_str(_trained_json(family))
    bos = dict(bos_token="</s>") if family == "opt" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", **bos)


def blip_config(tokenizer: BertTokenizer, vqa: bool = False, hidden: int = HIDDEN,
                text_positions: int = 512) -> BlipConfig:
    """BLIP with the real special ids, 2+2 layers, init 1/sqrt(hidden) (vision's 1e-10 is ~0).

    Captioning's vision tower is wider than the text model (cross-attention key/value then
    have their own shapes, as in BLIP-large); VQA's answer decoder cross-attends to the
    question encoder, so there both share one width (as in every BLIP VQA checkpoint).
    """
    init = hidden**-0.5
    vision_hidden = hidden if vqa else hidden + 16
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, encoder_hidden_size=vision_hidden,
                intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=text_positions, bos_token_id=tokenizer.bos_token_id,
                sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                initializer_range=init)
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8,
                  initializer_range=init)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=16,
                      initializer_range=init)


def blip2_config(family: str, tokenizer: PreTrainedTokenizerFast,
                 query_tokens: int = QUERY_TOKENS, text_positions: int = 2048) -> Blip2Config:
    """BLIP-2 ("opt" or "t5") with the tokenizer's ids, init ≈ 1/sqrt(hidden), no dropout.

    Depth: vision 2 layers, Q-Former 1, OPT 2, T5 1+1 (Flan-T5's gated-gelu FFN, untied head).
    T5 keeps its own init (already ∝ 1/sqrt(d_model)); without dropout train() is deterministic.
    """
    init = HIDDEN**-0.5
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "opt":
        text = OPTConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN,
                         word_embed_proj_dim=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=text_positions,
                         init_std=init, dropout=0.0, attention_dropout=0.0,
                         bos_token_id=tokenizer.bos_token_id, **ids)
    else:
        text = T5Config(vocab_size=len(tokenizer), d_model=HIDDEN, d_kv=16, d_ff=2 * HIDDEN,
                        num_layers=1, num_decoder_layers=1, num_heads=2,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0,
                        tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id,
                        **ids)
    vision = dict(hidden_size=HIDDEN + 16, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8,
                  initializer_range=init)
    qformer = dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=2 * HIDDEN, cross_attention_frequency=1,
                   initializer_range=init, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=query_tokens, initializer_range=init,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"))


def real_model(family: str, seed: int = 0, query_tokens: int = QUERY_TOKENS,
               text_positions: int | None = None) -> tuple[PreTrainedModel, object]:
    """(seeded model in eval mode, its processor) for one of FAMILIES.

    ``text_positions`` shrinks BLIP's (512) or OPT's (2048) position table; ``query_tokens``
    applies to BLIP-2.
    """
    images = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if family.startswith("blip2-"):
        lm = family.removeprefix("blip2-")
        processor = Blip2Processor(images, blip2_tokenizer(lm), num_query_tokens=query_tokens)
        positions = dict(text_positions=text_positions) if text_positions else {}
        config = blip2_config(lm, processor.tokenizer, query_tokens, **positions)
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
        with torch.no_grad():  # query tokens init to zeros: Q-Former adapters get no gradient
            model.query_tokens.normal_(0.0, HIDDEN**-0.5)
        return model, processor
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    processor = BlipProcessor(images, bert_tokenizer())
    vqa = family == "blip-vqa"
    positions = dict(text_positions=text_positions) if text_positions else {}
    config = blip_config(processor.tokenizer, vqa=vqa, **positions)
    torch.manual_seed(seed)
    cls = BlipForQuestionAnswering if vqa else BlipForConditionalGeneration
    return cls(config).eval(), processor


def write_real_checkpoint(path: str | Path, family: str, seed: int = 0, **shape) -> Path:
    """A real-shaped tiny checkpoint (model + processor, ``save_pretrained``) in ``path``;
    ``shape``: real_model's query_tokens / text_positions."""
    path = Path(path)
    model, processor = real_model(family, seed, **shape)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
