"""PLIF-paper SNN trainer."""
__version__ = "0.1.0"
