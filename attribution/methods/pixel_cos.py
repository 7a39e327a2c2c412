"""Pixel cosine (D-TRAK paper, Sec. 4 and Table 7): cosine similarity of the flattened pixels, a baseline without
gradients."""

from .base import SimilarityMethod


class PixelCos(SimilarityMethod):
    name = "pixel-cos"
    title = "Pixel cosine"
    summary = "cosine similarity of the flattened pixels"
    embedding = "pixels"
    cosine = True
