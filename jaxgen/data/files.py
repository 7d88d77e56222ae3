"""File helpers shared by the input pipelines (importable without grain or TFDS)."""
import contextlib
import fcntl


@contextlib.contextmanager
def file_lock(path):
  """An exclusive lock on `path` (created if needed): several processes preparing the same
  data wait for one of them."""
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
