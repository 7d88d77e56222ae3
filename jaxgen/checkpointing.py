"""Orbax checkpoints of the train state, the data iterator's position and the config.

Orbax writes each step into a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoints restorable.
"""
import json
import os
import sys

import orbax.checkpoint as ocp

from jaxgen.errors import UserError


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
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      _ignore_orphaned_read_callbacks()
      msg = str(e).splitlines()[0][:200] if str(e) else ''
      raise UserError(
          f'checkpoint {self.directory}/{step} is unreadable or does not match this config '
          f'({type(e).__name__}: {msg}); move that directory aside to resume from an earlier '
          f'step, or use a new --workdir (nothing was deleted)') from e
    return out.state, out.data

  def wait(self):
    self.manager.wait_until_finished()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    # Finish pending async saves and stop orbax's threads before any exit.
    self.wait()
    self.manager.close()


def _ignore_orphaned_read_callbacks():
  """A failed restore closes orbax's event loop while tensorstore reads still finish;
  their callbacks then raise 'Event loop is closed'. Drop just those tracebacks."""
  previous = sys.excepthook

  def hook(kind, value, tb):
    if not (kind is RuntimeError and 'Event loop is closed' in str(value)):
      previous(kind, value, tb)

  sys.excepthook = hook
