"""Orbax checkpoints of the train state, the data iterator's position and the config.

Orbax writes each step into a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoints restorable.
"""
import contextlib
import json
import os
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from jaxgen.errors import UserError

# Orbax writes a replicated array in parallel from its replicas, cutting each replica's part
# with its own eagerly compiled slice: on CPU ~15 ms of compile per (array, replica), ~2 s for
# one save of a small model on 8 devices. Below 1 MiB per slice that parallelism gains nothing.
# (Set on the registered handler: re-registering one warns on stderr and drops its metadata store.)
_array_handler = ocp.type_handlers.get_type_handler(jax.Array)
if hasattr(_array_handler, '_min_slice_bytes_for_replica_parallel'):
  _array_handler._min_slice_bytes_for_replica_parallel = 1 << 20


class Checkpointer:
  def __init__(self, workdir, *, keep, async_save=True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=('state', 'data', 'config'))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state, config):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))), force=True)

  def restore(self, step, abstract_state):
    """(state, data_state) at `step`; an unreadable checkpoint is a UserError, nothing deleted."""
    out = self._restore(step, ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def restore_fields(self, step, abstract_fields):
    """Only the named train-state fields at `step`, e.g. {'step': ..., 'ema_params': ...}
    (abstract arrays with shardings): a frozen model's load reads a quarter of its state,
    skipping the optimizer's moments and the raw parameters."""
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                abstract_fields)
    return self._restore(step, ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract_fields, restore_args=restore_args, partial_restore=True))).state

  def _restore(self, step, args):
    try:
      with _quiet_stderr_on_failure():
        return self.manager.restore(step, args=args)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      msg = str(e).splitlines()[0][:200] if str(e) else ''
      raise UserError(
          f'checkpoint {self.directory}/{step} is unreadable or does not match this config '
          f'({type(e).__name__}: {msg}); move that directory aside to resume from an earlier '
          f'step, or use a new --workdir (nothing was deleted)') from e

  def wait(self):
    self.manager.wait_until_finished()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    # Finish pending async saves and stop orbax's threads before any exit.
    self.wait()
    self.manager.close()


@contextlib.contextmanager
def _quiet_stderr_on_failure():
  """Holds back fd-level stderr while a restore runs: replayed if it succeeds, dropped if it
  fails. A failed restore closes orbax's event loop while tensorstore reads still finish,
  and their threads print 'Event loop is closed' tracebacks; the UserError says it all."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    except BaseException:
      time.sleep(0.5)  # let the orphaned reads finish into the capture
      raise
    else:
      sys.stderr.flush()
      captured.seek(0)
      os.write(saved, captured.read())
    finally:
      os.dup2(saved, 2)
      os.close(saved)
