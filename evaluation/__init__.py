"""Evaluation metrics computed as the reference toolkits define them (COCO caption, VQA)."""

from .caption_metrics import caption_scores, exact_match, ptb_tokenize
from .verdict import is_correct, normalize_caption
from .vqa_metrics import normalize_answer, vqa_accuracy, vqa_scores

__all__ = ["caption_scores", "exact_match", "is_correct", "normalize_answer", "normalize_caption",
           "ptb_tokenize", "vqa_accuracy", "vqa_scores"]
