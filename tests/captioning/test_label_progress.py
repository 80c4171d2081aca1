"""`label_images` reports its progress: once the images to caption are known, then after every batch."""

from __future__ import annotations

from lora_scripts.captioning.labeler import LabelOptions, label_images
from tests.captioning.helpers import write_images


class Fake:
    name = "fake"

    def caption(self, images: list) -> list[str]:
        return ["a caption"] * len(images)


def test_progress_after_each_batch(tmp_path):
    write_images(tmp_path, ["1.png", "2.png", "3.png", "4.png"])
    (tmp_path / "metadata.csv").write_text("file_name,text\n4.png,kept\n", encoding="utf-8")
    calls: list[tuple[int, int]] = []
    summary = label_images(
        LabelOptions(input_dir=tmp_path, batch_size=2), Fake, lambda *step: calls.append(step)
    )
    assert calls == [(0, 3), (2, 3), (3, 3)]
    assert summary.captioned == ["1.png", "2.png", "3.png"] and summary.kept == 1

    calls.clear()
    label_images(LabelOptions(input_dir=tmp_path), lambda: None, lambda *step: calls.append(step))
    assert calls == [(0, 0)]  # nothing left: no model loaded, one call
