"""Exceptions with messages meant for users: the CLI prints them and exits non-zero."""
from __future__ import annotations


class MpqkitError(Exception):
    """Base class: any error caused by user input or missing resources."""


class MissingResourceError(MpqkitError):
    """A data or model file/directory is absent; the message names the setting to change."""


class UnknownNameError(MpqkitError):
    """Unknown model, dataset, method or layer name."""


class BudgetError(MpqkitError):
    """Malformed budget string."""


class InfeasibleBudgetError(BudgetError):
    """No plan meets the budget; the message gives the smallest feasible value per constraint."""


class PlanError(MpqkitError):
    """Malformed, corrupt or inconsistent plan file."""


class CheckpointError(MpqkitError):
    """Corrupt checkpoint or one that does not match the architecture."""


class DataError(MpqkitError):
    """Empty or malformed data."""
