"""The trainer's own lines out of a Ray job's driver log (`trainctl logs` without --raw).

A driver log interleaves the trainer's lines (its `trainer.*` loggers, its prints, warnings, tracebacks) with
Ray's: job-manager and worker start-up chatter, and per epoch and per rank a ~1,300-character
`Reporting training result N: TrainingReport(checkpoint=..., metrics={...}) from rank R` dump. This keeps the
trainer's lines, turns each report into one short epoch line, drops the rest, and keeps only rank 0's lines
unless asked for every rank (then each worker line says its rank). Pure text in, text out: the CLI feeds it the
log piece by piece while following (`feed` keeps a partial last line until its end arrives), so it works on any
server that serves the raw log.
"""

from __future__ import annotations

import re

# "(RayTrainWorker pid=1510) text" or, from another node, "(RayTrainWorker pid=1510, ip=10.0.0.2) text".
_ACTOR = re.compile(r"^\((?P<actor>[\w.:-]+) pid=(?P<pid>\d+)(?:, ip=(?P<ip>[\w.:-]+))?\) ?(?P<text>.*)$")
# The controller's worker-group table: "- (ip=192.0.2.2, pid=1510) world_rank=0, local_rank=0, node_rank=0".
_GROUP_ROW = re.compile(r"\(ip=(?P<ip>[\w.:-]+), pid=(?P<pid>\d+)\) world_rank=(?P<rank>\d+)")
# A worker's own announcement: "Setting up process group for: env:// [rank=1, world_size=2]".
_PROCESS_GROUP = re.compile(r"\[rank=(?P<rank>\d+), world_size=\d+\]")
_REPORT = re.compile(r"^Reporting training result (?P<n>\d+): TrainingReport\(.*\bmetrics=\{(?P<metrics>.*)")
_REPORT_RANK = re.compile(r"\) from rank (?P<rank>\d+)\s*$")
# The trainer's logging format (trainer/run.py): "2026-12-06 04:41:53,888 trainer.fit INFO placement: ...".
_TRAINER_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ trainer[\w.]* [A-Z]+ ")
# Ray's Python logging: "2026-12-06 04:41:50,059\tINFO job_manager.py:581 -- ...".
_RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(?P<level>[A-Z]+) ")
# Other libraries' logging on the driver (MLflow: "2026/12/06 05:17:59 INFO mlflow...", Optuna: "[I 2026-12-06
# 04:59:23,517] ..."): shown from WARNING up only.
_OTHER_LOG = re.compile(
    r"^(?:\d{4}[-/]\d\d[-/]\d\d[ T][\d:,.]+\s+(?P<level>[A-Z]+)\b|\[(?P<letter>[DIWEF]) \d{4}-\d\d-\d\d [\d:,.]+\])"
)
# Terminal colours: Ray colours its actor prefixes when the driver's output is a terminal (the service strips
# them when it keeps a log; a log read elsewhere may still have them).
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Ray's C++ (glog) lines: "[2026-12-06 04:42:06,226 E 1402 1435] core_worker.cc:2465: ...".
_GLOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] ")
# Worker chatter Ray prints for every run; none of it is the trainer's.
_RAY_WORKER_NOISE = (
    "Moving model to device",
    "Wrapping provided model in DistributedDataParallel",
    "Setting up process group for",
    "Checkpoint successfully created at",
)
# What a non-worker actor (the Train controller, Tune's driver) says that is still worth showing.
_TROUBLE = re.compile(r"Traceback|Error|Exception|WARNING|ERROR|failed|Failed")
# The epoch line's fields, in this order, when the report has them.
_EPOCH_FIELDS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "images_per_s")
_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


def epoch_line(n: str, metrics: str) -> str:
    """`epoch 3: train_loss 0.7353 ... images/s 714` from a TrainingReport's metrics text (a Python dict repr,
    maybe cut short: fields are read one by one, so a cut loses only what was cut)."""
    values = dict(re.findall(rf"'(\w+)': ({_NUMBER})\b", metrics))
    parts = []
    for key in _EPOCH_FIELDS:
        if key in values:
            value = float(values[key])
            parts.append(f"images/s {value:.0f}" if key == "images_per_s" else f"{key} {value:.4g}")
    return f"epoch {values.get('epoch', n)}: " + "  ".join(parts)


class LogView:
    """Feed it raw log text (whole, or piece by piece while following); it returns the lines to show."""

    def __init__(self, *, all_ranks: bool = False) -> None:
        self.all_ranks = all_ranks
        self._ranks: dict[tuple[str, str | None], int] = {}  # (pid, ip or None) -> world rank
        self._partial = ""
        self._showing = True  # whether the last line was shown: an unprefixed line continues it (tracebacks)

    def feed(self, text: str) -> str:
        """The lines to show out of `text` (complete lines only; a partial last line waits for the next feed)."""
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()
        return "".join(shown + "\n" for line in lines if (shown := self._line(line)) is not None)

    def flush(self) -> str:
        """Whatever partial last line remains (the log's end)."""
        rest, self._partial = self._partial, ""
        shown = self._line(rest) if rest else None
        return shown + "\n" if shown is not None else ""

    def _line(self, line: str) -> str | None:
        shown = self._classify(_ANSI.sub("", line).rstrip("\r"))
        self._showing = shown is not None
        return shown

    def _classify(self, line: str) -> str | None:
        if (m := _GROUP_ROW.search(line)) is not None:
            self._ranks[(m["pid"], m["ip"])] = self._ranks[(m["pid"], None)] = int(m["rank"])
        actor = _ACTOR.match(line)
        if actor is None:
            return self._driver_line(line)
        text = actor["text"]
        if (m := _PROCESS_GROUP.search(text)) is not None and text.startswith("Setting up process group"):
            self._ranks[(actor["pid"], actor["ip"])] = int(m["rank"])
        if not actor["actor"].endswith("Worker") and "Trainable" not in actor["actor"]:
            # The Train controller and other Ray actors: only their trouble.
            return text if _TROUBLE.search(text) and not _GLOG.match(text) else None
        report = _REPORT.match(text)
        rank: int | None
        if report is not None:
            m = _REPORT_RANK.search(text)
            rank = int(m["rank"]) if m else self._rank_of(actor["pid"], actor["ip"])
            text = epoch_line(report["n"], report["metrics"])
        else:
            if text.startswith(_RAY_WORKER_NOISE) or _GLOG.match(text):
                return None
            rank = self._rank_of(actor["pid"], actor["ip"])
        if self.all_ranks:
            return f"[rank {rank if rank is not None else '?'}] {text}"
        # A worker whose rank is not known yet (its group's table was cut off) is shown rather than hidden.
        return text if rank in (0, None) else None

    def _rank_of(self, pid: str, ip: str | None) -> int | None:
        return self._ranks.get((pid, ip), self._ranks.get((pid, None)))

    def _driver_line(self, line: str) -> str | None:
        if _TRAINER_LOG.match(line) or line.startswith("=== attempt "):
            return line
        if (m := _RAY_LOG.match(line)) is not None:
            return line if m["level"] in ("WARNING", "ERROR", "CRITICAL") else None
        if _GLOG.match(line):
            return None
        if (m := _OTHER_LOG.match(line)) is not None:
            return line if m["level"] in ("WARNING", "ERROR", "CRITICAL") or m["letter"] in ("W", "E", "F") else None
        if line.startswith("Running entrypoint for job"):
            return None
        # Anything else (a print, a traceback's next line, a summary) goes with the line before it.
        return line if self._showing else None


def trainer_lines(text: str, *, all_ranks: bool = False) -> str:
    """The whole of `text`, filtered (see LogView)."""
    view = LogView(all_ranks=all_ranks)
    return view.feed(text) + view.flush()
