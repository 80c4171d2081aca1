"""Automatic captions: BLIP sentences, WD14 booru tags."""
