"""Metric learning on image folders: shards, triplet embeddings, kNN and classifier heads."""
__version__ = "0.1.0"
