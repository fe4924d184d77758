"""DVS128 Gesture preprocessing."""
__version__ = "0.1.0"
