"""Errors and warnings the readers and writers raise: one sentence naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class ReadError(ValueError):
    """A file or folder could not be read as a medical image."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WriteError(ValueError):
    """A volume could not be written to the requested file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MultipleSeriesError(ReadError):
    """A folder holds several image series; pass ``series=`` (UID or index) to pick one.

    ``choices`` lists one short description per series, in the order ``series=<index>`` uses.
    """

    def __init__(self, path: str | Path, choices: list[str], uids: list[str]):
        self.choices = list(choices)
        self.uids = list(uids)
        listing = "; ".join(f"[{i}] {c}" for i, c in enumerate(self.choices))
        super().__init__(path, f"holds {len(self.choices)} image series, choose one with series=: {listing}")


class FolderTooLargeError(ReadError):
    """A folder holds more files than medvision searches (see ``io.limits.MAX_FOLDER_FILES``)."""


class GeometryWarning(UserWarning):
    """The geometry read is usable but suspect (a missing slice, uneven spacing)."""
