"""Errors raised on bad input. Each message names the file, column, gene or value at fault."""


class ScprotoInputError(ValueError):
    """Bad user input: a missing store, an unknown obs column, non-count values, duplicate genes…"""
