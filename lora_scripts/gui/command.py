"""The `lora-scripts gui` subcommand (argparse only: the web stack is imported when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_gui_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gui", help="open the web app: dataset, captions, config, check, train, generate")
    p.add_argument("--port", type=int, default=7860, help="the port (default 7860)")
    p.add_argument(
        "--root",
        type=Path,
        action="append",
        help="a folder the app may read and write (repeatable; default: the current folder)",
    )
    p.add_argument(
        "--listen",
        action="store_true",
        help="accept connections from other machines (every request then needs the printed access token)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name the server may be reached by (a reverse proxy's)",
    )
    p.add_argument(
        "--max-upload-mb", type=float, default=50, help="the largest image the app accepts (default 50 MB)"
    )
    p.add_argument(
        "--webui-lora-dir",
        type=Path,
        metavar="DIR",
        help="WebUI's models/Lora folder: the LoRA library lists it and copies LoRAs into it",
    )
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    p.set_defaults(func=_cmd_gui)


def _cmd_gui(args: argparse.Namespace) -> int:
    from lora_scripts.gui.server import serve

    serve(
        args.root or [Path.cwd()],
        port=args.port,
        listen=args.listen,
        open_browser=not args.no_browser,
        allow_hosts=tuple(args.allow_host),
        max_upload_mb=args.max_upload_mb,
        webui_lora_dir=args.webui_lora_dir,
    )
    return 0
