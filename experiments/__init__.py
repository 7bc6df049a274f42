"""The research scripts behind the committed protection results (bench/results/): teachers trained from the
recipe files (recipes/), audited, and written up. Each script is `python -m experiments.NAME --help`."""
