"""Starting the web app: the roots, the guards for the chosen interface, uvicorn, and the browser."""

from __future__ import annotations

import secrets
import threading
import webbrowser
from pathlib import Path

from lora_scripts.gui.app import GuiSettings, create_app
from lora_scripts.gui.lora_folders import webui_folder
from lora_scripts.gui.roots import Roots
from lora_scripts.gui.security import SecuritySettings, own_host_names

DEFAULT_PORT = 7860


def make_settings(
    roots: list[Path],
    *,
    listen: bool,
    allow_hosts: tuple[str, ...] = (),
    max_upload_mb: float = 50,
    webui_lora_dir: Path | None = None,
) -> GuiSettings:
    """The app's settings: `listen` (other machines may connect) adds this machine's names to the allowed
    hosts and an access token every request must carry."""
    return GuiSettings(
        roots=Roots(roots),
        security=SecuritySettings(
            allowed_hosts=own_host_names(listen, allow_hosts),
            access_token=secrets.token_urlsafe(24) if listen else None,
        ),
        max_upload_bytes=int(max_upload_mb * 2**20),
        webui_lora_dir=webui_folder(webui_lora_dir),
    )


def serve(
    roots: list[Path],
    *,
    port: int = DEFAULT_PORT,
    listen: bool = False,
    open_browser: bool = True,
    allow_hosts: tuple[str, ...] = (),
    max_upload_mb: float = 50,
    webui_lora_dir: Path | None = None,
) -> None:
    """Run the web app until Ctrl-C: on 127.0.0.1, or on every interface with `listen`."""
    import uvicorn

    settings = make_settings(
        roots,
        listen=listen,
        allow_hosts=allow_hosts,
        max_upload_mb=max_upload_mb,
        webui_lora_dir=webui_lora_dir,
    )
    app = create_app(settings)
    host = "0.0.0.0" if listen else "127.0.0.1"  # noqa: S104 - all interfaces only when asked (--listen)
    token = settings.security.access_token
    url = f"http://127.0.0.1:{port}/" + (f"?token={token}" if token else "")
    print(f"lora-scripts gui: {url}")
    if listen:
        print(
            f"Listening on all interfaces; from another machine: http://<this machine>:{port}/?token={token}"
        )
    for root in settings.roots:
        print(f"  root {root.name}: {root.path}")
    if settings.webui_lora_dir is not None:
        print(f"  WebUI LoRA folder: {settings.webui_lora_dir}")
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")
