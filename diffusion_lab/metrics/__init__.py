"""IS / FID / KID through torch-fidelity: feature extractors, reference statistics, evaluation."""

from diffusion_lab.metrics.evaluate import evaluate, generate_features
from diffusion_lab.metrics.extractors import WeightsError, make_extractor
from diffusion_lab.metrics.fidelity import MetricsConfig, compute_metrics, extract, statistics
from diffusion_lab.metrics.reference import ReferenceMismatchError, get_reference, reference_from_features

__all__ = ["evaluate", "generate_features", "WeightsError", "make_extractor", "MetricsConfig", "compute_metrics",
           "extract", "statistics", "ReferenceMismatchError", "get_reference",
           "reference_from_features"]
