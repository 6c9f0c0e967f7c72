"""Exceptions shared by every client of the engine."""


class EngineDeadError(RuntimeError):
    """The scheduler or a worker died; the engine cannot serve any more requests."""
