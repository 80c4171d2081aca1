"""Where the web app looks for LoRA files: the runs' output folders under the roots, and the WebUI
`models/Lora` folder given with `--webui-lora-dir` (the one place outside the roots the app may read, and
copy LoRA files into, never replacing one).

Files are named to the page as `ROOT/relative/path` inside a root and `WebUI/relative/path` in the WebUI
folder; `LoraFolders.resolve` turns such a name back into a path and refuses anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lora_scripts.errors import UserError
from lora_scripts.gui.roots import Roots
from lora_scripts.training.runs import find_runs

WEBUI_NAME = "WebUI"


@dataclass(frozen=True)
class LoraFolders:
    roots: Roots
    webui: Path | None  # resolved, or None when --webui-lora-dir was not given

    def run_folders(self) -> list[Path]:
        """The output folders of the runs under the roots (as the Train page finds them), newest first."""
        return [run.output_dir for run in find_runs([root.path for root in self.roots])]

    def folders(self) -> list[Path]:
        """Every folder to scan for LoRA files: the run folders, then the WebUI folder."""
        return self.run_folders() + ([self.webui] if self.webui is not None else [])

    def shown(self, path: Path) -> str:
        """The name the page uses for `path` (a file in a run folder or in the WebUI folder)."""
        resolved = Path(path).resolve()
        if self.webui is not None and (resolved == self.webui or self.webui in resolved.parents):
            relative = resolved.relative_to(self.webui).as_posix()
            return WEBUI_NAME if relative == "." else f"{WEBUI_NAME}/{relative}"
        return self.roots.name_of(resolved)

    def resolve(self, name: str, *, must_exist: bool = True) -> Path:
        """The path a page name means; UserError for a name outside the roots and the WebUI folder."""
        text = (name or "").replace("\\", "/")
        parts = PurePosixPath(text).parts
        if not parts or parts[0] != WEBUI_NAME or self.webui is None:
            return self.roots.resolve(name, must_exist=must_exist)
        if ".." in parts:
            raise UserError(f"'{name}': '..' is not allowed; give a path inside the WebUI folder.")
        resolved = self.webui.joinpath(*parts[1:]).resolve()
        if resolved != self.webui and self.webui not in resolved.parents:
            raise UserError(f"'{name}': it leads out of the WebUI folder (a symlink?); refused.")
        if must_exist and not resolved.exists():
            raise UserError(f"'{name}': no such file or folder.")
        return resolved


def webui_folder(path: Path | None) -> Path | None:
    """`--webui-lora-dir`, resolved; UserError when it is not an existing folder."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise UserError(
            f"--webui-lora-dir {path}: not a folder; give WebUI's models/Lora folder "
            "(e.g. ~/stable-diffusion-webui/models/Lora)."
        )
    return resolved
