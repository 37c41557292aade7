"""Evaluation metrics computed as the reference toolkits define them (COCO caption, VQA)."""

from .caption_metrics import caption_scores, exact_match, ptb_tokenize
from .vqa_metrics import normalize_answer, vqa_accuracy, vqa_scores

__all__ = ["caption_scores", "exact_match", "normalize_answer", "ptb_tokenize", "vqa_accuracy",
           "vqa_scores"]
