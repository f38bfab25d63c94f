"""selectune: shared plumbing (settings, errors, file helpers) and the command line.

Run from the repository root:  python -m selectune --help
"""
