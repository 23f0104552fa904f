"""The project's root exception and the errors of the pure core."""

from __future__ import annotations


class RaylineError(Exception):
    """Root of every error Rayline raises on purpose."""


class ConfigurationError(RaylineError):
    """Settings are missing, contradictory or point at something that is not there."""


class InvalidInputError(RaylineError):
    """Input from outside (an HTTP body, a Kafka record, a file) cannot be used."""
