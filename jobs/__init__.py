"""Ray job entry points: one module per job, each run as `python -m jobs.<name> --config FILE a.b=value`."""
