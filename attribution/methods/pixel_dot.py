"""Pixel dot (D-TRAK paper, Sec. 4 and Table 7): dot product of the flattened pixels, a baseline without gradients."""

from ..features.embeddings import PixelFeatures
from .base import SimilarityMethod


class PixelDot(SimilarityMethod):
    name = "pixel-dot"
    title = "Pixel dot"
    summary = "dot product of the flattened pixels"
    features = PixelFeatures
    cosine = False
