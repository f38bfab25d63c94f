"""selectune's command line, the roof: `python -m selectune --help`. Nothing imports it."""
