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
        rate = total / p.elapsed if p.elapsed > 0 else 0.0
        done = min(p.elapsed, p.duration)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(p.duration, 1e-9), completed=done, width=40),
            Text(f"{done:5.1f}/{p.duration:g} s"),
        )
        head = Text.assemble(
            ("requests ", "bold"),
            f"{total:,} ({rate:,.0f}/s)  ",
            ("ok ", "bold"),
            (f"{by_class['success']:,}", "green"),
            f"  in flight {p.inflight:,}  actions {p.actions_done}/{p.actions_total}",
        )
        fails = Text()
        for cls in CLASSES[1:]:
            n = by_class[cls]
            fails.append(f"{cls} ", style="bold" if n else "dim")
            fails.append(f"{n:,}  ", style="bold red" if n else "dim")
        last = Text(f"last action: {p.last_action}" if p.last_action else "", style="cyan")
        return Group(bar, head, fails, last)
