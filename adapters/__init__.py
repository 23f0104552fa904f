"""One module per external system; driver errors are translated here."""
