"""Experiment configs, installed as ``moejax.configs``; each file's ``get_config(arg)`` returns a ConfigDict."""
