"""Pieces shared by the controller and the jobrunner: the contract between them (exit codes,
labels, termination messages), database settings, and structured logging."""
