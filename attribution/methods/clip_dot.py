"""CLIP dot (D-TRAK paper, Sec. 4 and Table 7): dot product of CLIP image embeddings (weights from a local file), a
baseline without gradients."""

from ..features.embeddings import ClipFeatures
from .base import SimilarityMethod


class CLIPDot(SimilarityMethod):
    name = "clip-dot"
    title = "CLIP dot"
    summary = "dot product of CLIP image embeddings (weights from a local file)"
    features = ClipFeatures
    cosine = False
