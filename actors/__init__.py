"""Ray actors: thin shells that poll, call ``core`` and write through ``adapters``."""
