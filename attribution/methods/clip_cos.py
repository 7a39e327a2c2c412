"""CLIP cosine (D-TRAK paper, Sec. 4 and Table 7): cosine similarity of CLIP image embeddings (weights from a local
file), a baseline without gradients."""

from ..features.embeddings import ClipFeatures
from .base import SimilarityMethod


class CLIPCos(SimilarityMethod):
    name = "clip-cos"
    title = "CLIP cosine"
    summary = "cosine similarity of CLIP image embeddings (weights from a local file)"
    features = ClipFeatures
    cosine = True
