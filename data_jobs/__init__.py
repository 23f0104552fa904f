"""Ray Data jobs, each runnable with `ray job submit`."""
