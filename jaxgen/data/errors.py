"""Errors raised by the data pipeline (own module so the builder and the pipeline can share it)."""


class DatasetNotFoundError(Exception):
  """The raw data for a dataset is missing; the message says how to get it."""
