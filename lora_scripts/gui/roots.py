"""The folders the web app may read and write: every path a request names is resolved inside one of them.

A request names a path as `root/relative/path`, where `root` is a root's name (its folder name, made unique).
Absolute paths, `..` components and symlinks that lead out of the root are refused with one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lora_scripts.errors import UserError


@dataclass(frozen=True)
class Root:
    name: str
    path: Path  # resolved


class Roots:
    """The allowed roots, by name."""

    def __init__(self, folders: list[Path]):
        if not folders:
            raise ValueError("at least one root")
        self._roots: dict[str, Root] = {}
        for folder in folders:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise UserError(f"--root {folder}: not a folder; give an existing folder.")
            name, n = path.name or "root", 2
            while name in self._roots:
                name, n = f"{path.name or 'root'}-{n}", n + 1
            self._roots[name] = Root(name, path)

    def __iter__(self):
        return iter(self._roots.values())

    def resolve(self, user_path: str, *, must_exist: bool = False) -> Path:
        """The file or folder `root/relative/path` names, inside its root; UserError otherwise."""
        text = (user_path or "").replace("\\", "/")
        parts = PurePosixPath(text).parts
        if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
            raise UserError(f"'{user_path}': give a path inside a root, as ROOT/relative/path.")
        if ".." in parts:
            raise UserError(f"'{user_path}': '..' is not allowed; give a path inside a root.")
        root = self._roots.get(parts[0])
        if root is None:
            names = ", ".join(self._roots)
            raise UserError(f"'{user_path}': '{parts[0]}' is not a root; the roots are {names}.")
        target = root.path.joinpath(*parts[1:])
        resolved = target.resolve()  # follows symlinks: one that leads out of the root is caught here
        if resolved != root.path and root.path not in resolved.parents:
            raise UserError(f"'{user_path}': it leads out of the root '{root.name}' (a symlink?); refused.")
        if must_exist and not resolved.exists():
            raise UserError(f"'{user_path}': no such file or folder.")
        return resolved

    def name_of(self, path: Path) -> str:
        """`root/relative/path` for a path inside a root (the inverse of `resolve`)."""
        resolved = Path(path).resolve()
        for root in self._roots.values():
            if resolved == root.path:
                return root.name
            if root.path in resolved.parents:
                return f"{root.name}/{resolved.relative_to(root.path).as_posix()}"
        raise UserError(f"'{path}' is outside every root.")
