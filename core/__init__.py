"""The ground floor: errors, files, data rows, config loading, settings and the workspace.
Every stage stands on it; it imports no stage."""
