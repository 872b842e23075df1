"""TaskFlow's storage made cheaper for the serial engine
(``serial_engine``): one write per atom transition (its progress mark
rides along), a flow-state change that writes only the flow's row, and
one plain lock instead of a reader-writer lock."""
import threading

from taskflow import exceptions as tf_exc
from taskflow import states as tf_states
from taskflow import storage as tf_storage
from taskflow.persistence import models as tf_models

from migrateflow import lifecycle, persistence


class OneLock:
    """TaskFlow's storage reader-writer lock as one reentrant lock.

    A serial engine's storage is used by the thread running it (and rarely
    by a reader elsewhere); fasteners' reader-writer lock costs a condition
    variable round per call, and the engine makes a couple of thousand
    such calls per flow.  Readers now exclude each other too: stricter,
    never looser.
    """

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = threading.RLock()

    def read_lock(self):
        return self._lock

    write_lock = read_lock


#: the progress TaskFlow's task action sets right after it persisted a
#: task's state (running or reverting: 0.0, done: 1.0; reset: 0.0)
_PROGRESS_AFTER = {tf_states.RUNNING: 0.0, tf_states.REVERTING: 0.0,
                   tf_states.SUCCESS: 1.0, tf_states.REVERTED: 1.0,
                   tf_states.PENDING: 0.0, tf_states.IGNORE: 0.0}


class Storage(tf_storage.Storage):
    """TaskFlow storage whose state writes carry the engine's progress marks.

    The engine persists a task's state, then its progress (0.0 when it
    starts, 1.0 when done): two writes per transition, the second of which
    no resume reads.  Here the state's write carries the progress that
    follows it, and the engine's own progress update is kept in memory
    (any difference reaches the database with the atom's or the flow's next
    write).  Progress a task reports itself (with details) is written at
    once, as before.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = OneLock()
        self._unsaved = set()  # atoms whose metadata changed since their last write

    # TaskFlow's own retry policy for a failed save (three attempts, five
    # seconds apart), without building a tenacity controller per save
    @staticmethod
    def _saving(save):
        for attempt in range(1, tf_storage.RETRY_ATTEMPTS + 1):
            try:
                return save()
            except tf_exc.StorageFailure:
                if attempt == tf_storage.RETRY_ATTEMPTS:
                    raise
                lifecycle.sleep(tf_storage.RETRY_WAIT_TIMEOUT)

    def _save_atom_detail(self, conn, original_atom_detail, atom_detail):
        saved = self._saving(lambda: original_atom_detail.update(
            conn.update_atom_details(atom_detail)))
        self._unsaved.discard(original_atom_detail.name)
        return saved

    def _save_flow_detail(self, conn, original_flow_detail, flow_detail):
        saved = self._saving(lambda: original_flow_detail.update(
            conn.update_flow_details(flow_detail)))
        self._unsaved.clear()
        return saved

    def set_flow_state(self, state):
        """A flow's state change writes its own row only when every atom is
        stored as held here (TaskFlow's way reads and compares them all)."""
        with self._lock.write_lock():
            if self._unsaved or not isinstance(self._backend, persistence.SQLBackend):
                return super().set_flow_state(state)
            source = self._flowdetail
            clone = source.copy(retain_contents=False)
            clone.state = state
            self._with_connection(lambda conn: self._saving(
                lambda: conn.update_flow_row(clone)))
            source.state = state
            return None

    def _progress_for(self, atom_name, state):
        """Put the progress the engine sets right after persisting
        ``state`` in the atom's metadata now, so that write carries it."""
        progress = _PROGRESS_AFTER.get(state)
        uuid = self._atom_name_to_uuid.get(atom_name)
        if progress is not None and uuid is not None:
            source = self._flowdetail.find(uuid)
            if isinstance(source, tf_models.TaskDetail) and \
                    source.meta.get(tf_storage.META_PROGRESS) != progress:
                source.meta[tf_storage.META_PROGRESS] = progress
                self._unsaved.add(atom_name)  # until the write below succeeded

    def set_atom_state(self, atom_name, state):
        with self._lock.write_lock():
            self._progress_for(atom_name, state)
            return super().set_atom_state(atom_name, state)

    def save(self, atom_name, result, state=tf_states.SUCCESS):
        with self._lock.write_lock():
            self._progress_for(atom_name, state)
            return super().save(atom_name, result, state=state)

    def set_task_progress(self, task_name, progress, details=None):
        if details is not None:
            return super().set_task_progress(task_name, progress, details=details)
        with self._lock.write_lock():
            source, _ = self._atomdetail_by_name(task_name,
                                                 expected_type=tf_models.TaskDetail)
            if source.meta.get(tf_storage.META_PROGRESS) != progress:
                source.meta[tf_storage.META_PROGRESS] = progress
                self._unsaved.add(task_name)
        return None
