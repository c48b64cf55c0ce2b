"""Live progress on the terminal (rich)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from sdserve.drill.outcome import CLASSES, classify
from sdserve.drill.runner import Progress


class LiveProgress:
    """A context manager whose :meth:`update` is the drill's ``on_progress``."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._state = Progress()
        self._live = Live(
            get_renderable=self._render,
            console=self.console,
            refresh_per_second=4,
            transient=False,
        )

    def __enter__(self) -> LiveProgress:
        self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.__exit__(exc_type, exc, tb)

    def update(self, progress: Progress) -> None:
        self._state = progress

    def _render(self) -> Group:
        p = self._state
        by_class = dict.fromkeys(CLASSES, 0)
        for code, n in p.counts.items():
            by_class[classify(code)] += n
        total = sum(by_class.values())
        table = Table(box=None, padding=(0, 1), show_header=True, header_style="bold")
        table.add_column("elapsed")
        table.add_column("requests", justify="right")
        table.add_column("req/s", justify="right")
        for cls in CLASSES:
            table.add_column(cls, justify="right")
        table.add_column("in flight", justify="right")
        table.add_column("actions", justify="right")
        rate = total / p.elapsed if p.elapsed > 0 else 0.0
        cells = []
        for cls in CLASSES:
            n = by_class[cls]
            style = "green" if cls == "success" else ("bold red" if n else "dim")
            cells.append(Text(f"{n:,}", style=style))
        table.add_row(
            f"{min(p.elapsed, p.duration):5.1f}/{p.duration:g} s",
            f"{total:,}",
            f"{rate:,.0f}",
            *cells,
            f"{p.inflight:,}",
            f"{p.actions_done}/{p.actions_total}",
        )
        done = min(p.elapsed, p.duration)
        bar = ProgressBar(total=max(p.duration, 1e-9), completed=done, width=60)
        last = Text(f"last action: {p.last_action}" if p.last_action else "", style="cyan")
        return Group(bar, table, last)
