"""Pixel cosine (D-TRAK paper, Sec. 4 and Table 7): cosine similarity of the flattened pixels, a baseline without
gradients."""

from ..features.embeddings import PixelFeatures
from .base import SimilarityMethod


class PixelCos(SimilarityMethod):
    name = "pixel-cos"
    title = "Pixel cosine"
    summary = "cosine similarity of the flattened pixels"
    features = PixelFeatures
    cosine = True
