"""Protocol events -> what the panel shows (progress bar value and text, log lines). Standard library only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from nephireg import protocol
from NePhiRegistrationLib.i18n import _


def formatSeconds(seconds: Optional[float]) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``; ``""`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass
class ProgressState:
    """Folds events into the current stage, percent (0..100 within the stage) and ETA."""

    stage: str = ""
    message: str = field(default_factory=lambda: _("Starting..."))
    percent: int = 0
    eta: str = ""
    elapsed: str = ""
    device: str = ""
    logLines: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)  # messages of the run's ``warning`` events

    def update(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == protocol.Event.START.value:
            self.device = str(event.get("device", ""))
            self.message = _("Started ({method}, {preset}, {device})").format(
                method=event.get("method", ""), preset=event.get("preset", ""), device=self.device)
            self.logLines.append(self.message)
        elif kind == protocol.Event.STAGE.value:
            self.stage = str(event.get("stage", ""))
            self.message = str(event.get("message") or self.stage)
            self.percent, self.eta = 0, ""
            self.logLines.append(f"{self.stage}: {self.message}")
        elif kind == protocol.Event.PROGRESS.value:
            step, total = event.get("step") or 0, event.get("total") or 0
            self.percent = int(100 * step / total) if total else 0
            self.eta = formatSeconds(event.get("eta_s"))
            self.elapsed = formatSeconds(event.get("elapsed_s"))
        elif kind == protocol.Event.LOG.value:
            level = event.get("level", "info")
            text = str(event.get("message", ""))
            self.logLines.append(_("Warning: {message}").format(message=text) if level == "warning" else text)
        elif kind == protocol.Event.WARNING.value:
            self.warnings.append(str(event.get("message", "")))
            self.message = _("Warning: {message}").format(message=self.warnings[-1])  # the status line shows it
            self.logLines.append(self.message)
        elif kind == protocol.Event.RESULT.value:
            self.percent, self.eta, self.message = 100, "", _("Done")
        elif kind == protocol.Event.ERROR.value:
            self.message = _("Error: {message}").format(message=event.get("message", ""))
            self.logLines.append(self.message)

    def barText(self) -> str:
        """Text drawn on the progress bar, e.g. ``"optimise 40% - ETA 12 s"``."""
        text = f"{self.stage or self.message} {self.percent}%"
        return text + (f" - ETA {self.eta}" if self.eta else "")

    def takeLogLines(self) -> List[str]:
        lines, self.logLines = self.logLines, []
        return lines
