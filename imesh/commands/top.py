"""`imesh top`: `imesh status`, refreshed in place until Ctrl-C.

Plain ANSI, no curses or rich: the frame is redrawn from the top-left corner each interval, each
line clearing its own tail, on the terminal's alternate screen (so the shell's scrollback is left as
it was). ``--once`` prints one frame without escapes, for scripts and tests; ``-o json|yaml``
prints status documents instead of tables.
"""

from __future__ import annotations

import shutil
import sys
import time

import click

from imesh import views
from imesh.client import MeshError
from imesh.context import Context, mesh_options
from imesh.output import render_document

ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
CURSOR_HIDE, CURSOR_SHOW = "\x1b[?25l", "\x1b[?25h"
HOME, CLEAR_LINE_TAIL, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


def frame(client, server: str, output: str, live: bool = False) -> str:
    """One screenful: a header line, then `imesh status` (or the reason it cannot be had)."""
    stamp = time.strftime("%H:%M:%S")
    try:
        status = client.status()
    except MeshError as exc:
        return f"imesh top  {server}  {stamp}\n\n{exc}"
    document = render_document(views.status_document(status), output)
    if document is not None:
        return document
    hint = "  (Ctrl-C quits)" if live else ""
    return f"imesh top  {server}  {stamp}{hint}\n" + views.status_text(status)


def redraw(text: str) -> str:
    """`text` as an in-place redraw: home, each line clearing its tail, then clear what is below."""
    rows = shutil.get_terminal_size((120, 50)).lines
    lines = text.splitlines()[: max(1, rows - 1)]
    return HOME + "".join(line + CLEAR_LINE_TAIL + "\n" for line in lines) + CLEAR_BELOW


@click.command()
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="Seconds between refreshes."
)
@click.option("--once", is_flag=True, help="Print one frame and exit (no terminal escapes).")
@click.option(
    "--iterations",
    type=click.IntRange(min=0),
    default=0,
    hidden=True,
    help="Stop after N refreshes (0: until Ctrl-C); for tests.",
)
@mesh_options
@click.pass_obj
def top(obj: Context, interval: float, once: bool, iterations: int) -> None:
    """Endpoints with load, rate, p50/p99 and errors; models with weights; Envoy sync state, live."""
    with obj.client() as client:
        if once:
            click.echo(frame(client, obj.server, obj.output))
            return
        out = sys.stdout
        out.write(ALT_SCREEN_ON + CURSOR_HIDE)
        try:
            count = 0
            while True:
                out.write(redraw(frame(client, obj.server, obj.output, live=True)))
                out.flush()
                count += 1
                if iterations and count >= iterations:
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            pass
        finally:
            out.write(CURSOR_SHOW + ALT_SCREEN_OFF)
            out.flush()
