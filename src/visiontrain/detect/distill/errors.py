"""The one error type of distillation."""

from __future__ import annotations


class DistillError(ValueError):
    """A teacher / student combination that cannot be distilled; the message says why and what to do."""
