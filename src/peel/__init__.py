"""PEEL: Personalized Elastic Embedding Learning for on-device recommendation."""

__version__ = "0.1.0"
