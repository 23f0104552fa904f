"""Wiring: settings, the `rayline` command line, the local stack, deployment."""
