"""Evaluation protocols (kNN, probes, fine-tuning, few-shot, diagnostics, segmentation) for any encoder."""

from mimkit.eval.protocols import EvalContext, EvalOptions, evaluate

__all__ = ["EvalContext", "EvalOptions", "evaluate"]
