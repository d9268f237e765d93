"""Shipped recipes (YAML) and their prompt files, installed as the package data `fastnft.configs`."""
