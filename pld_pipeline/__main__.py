"""`python -m pld_pipeline` runs the `pld` command line (the entry point is the only place that imports it)."""
from pld_pipeline_cli.app import main

main()
