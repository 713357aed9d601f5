"""Dock panels: each collects parameters, runs one task function off the GUI thread, adds a layer."""
