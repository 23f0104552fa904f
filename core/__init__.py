"""Pure logic of Rayline: envelopes, validation, windows, assignment.

Nothing here does I/O, imports Ray or a driver, or reads a clock directly.
"""
