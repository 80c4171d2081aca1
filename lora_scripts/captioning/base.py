"""What every captioner offers the labeller: captions for a batch of images."""

from __future__ import annotations

from typing import Protocol

from PIL import Image


class Captioner(Protocol):
    """A loaded captioning model.

    `caption` takes RGB PIL images (any size; the captioner resizes) and returns one caption per image, in
    order. Loading (and its clear errors for missing models) happens in the captioner's constructor or
    factory, before any image is read.
    """

    name: str  # "blip", "wd14": written to the summary

    def caption(self, images: list[Image.Image]) -> list[str]: ...
