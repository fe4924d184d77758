"""Trained networks out of the toolkit (work in progress)."""
