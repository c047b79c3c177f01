"""The `loramux` command: the one entry point that composes the service's commands with the
training package's, so neither package imports the other's CLI (`python -m loramux ...`)."""
