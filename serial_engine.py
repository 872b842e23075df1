"""TaskFlow's serial engine, made cheaper for many short flows.

Same semantics, fewer writes and less work per flow (each figure per
migration of the live-migration flow, measured by bench/bench_drain.py
--serial): one write per atom transition (its progress mark rides along),
a flow-state change that writes only the flow's row, one transaction to
persist a new flow (logbook, flow detail, store, pending atoms), one plain
lock instead of a reader-writer lock, and each thread's flows built and
compiled once and reused when not running, and the walk for the next
atoms to run stopping at atoms not done yet.  A new flow whose atoms form
one chain (every move flow: linear flows, a retry controller on a
subflow) runs its atoms one after the other without TaskFlow's state
machine (``Engine.run``): the same actions, so the same writes and
notifications, in the same order; at the first failure the machine takes
over from what is stored, as when it resumes a flow.  It relies on
TaskFlow's internals (``Storage``, ``SerialActionEngine``): setup.py
bounds the version, tests/test_perf_engine.py, tests/test_chain_engine.py
and the crash matrices check it.  The storage is ``serial_storage``'s, the
runtime ``serial_runtime``'s.
"""
import contextlib
import logging
import threading
import weakref

import fasteners
import taskflow.engines
from oslo_utils import reflection, uuidutils
from taskflow import exceptions as tf_exc
from taskflow import states as tf_states
from taskflow import storage as tf_storage
from taskflow.engines.action_engine import compiler as tf_compiler
from taskflow.engines.action_engine import engine as tf_engine
from taskflow.persistence import models as tf_models
from taskflow.types import failure as tf_failure
from taskflow.types import notifier as tf_notifier
from taskflow.utils import misc as tf_misc

from migrateflow import lifecycle
from migrateflow.serial_runtime import Runtime, chain_of
from migrateflow.serial_storage import Storage

LOG = logging.getLogger(__name__)

_compiled = threading.local()  # this thread's flows and their compilation
_generation = [0]  # flows built before the last reset() are built again
_validated = weakref.WeakKeyDictionary()  # compilation -> store key sets it passed with


class Engine(tf_engine.SerialActionEngine):
    """The serial engine with :class:`Storage`, given its flow's
    compilation (``compile`` would make the same one again).  ``fresh``:
    nothing of the flow ran yet (``load``): when its atoms form one chain
    ``run`` goes down it (see ``_run_chain``)."""

    def __init__(self, flow, flow_detail, backend, compilation=None, reuse_key=None,
                 store_keys=None, fresh=False):
        super().__init__(flow, flow_detail, backend, {})
        self._given_compilation, self._reuse_key = compilation, reuse_key
        self._store_keys = store_keys
        self._fresh = fresh
        # between two steps (each step's state is persisted and announced
        # then, nothing is held): an urgent thread may run first
        self.atom_notifier.register(tf_notifier.Notifier.ANY, _pause)

    def validate(self):
        # a reused compilation already validated with the same store keys
        # (the only injected values of a new flow) validates the same again
        seen = _validated.get(self._given_compilation) \
            if self._given_compilation is not None else None
        if seen is not None and self._store_keys is not None and self._store_keys in seen:
            self._validated = True
            return
        super().validate()
        if self._given_compilation is not None and self._store_keys is not None:
            _validated.setdefault(self._given_compilation, set()).add(self._store_keys)

    def run(self, timeout=None):
        chain = chain_of(self._given_compilation) \
            if self._fresh and self._given_compilation is not None else None
        if chain is None:
            return super().run(timeout=timeout)
        self._fresh = False
        with fasteners.try_lock(self._lock) as was_locked:
            if not was_locked:
                raise tf_exc.ExecutionFailure("Engine currently locked, please try again later")
            if self._run_chain(chain):
                return None
        return super().run(timeout=timeout)

    def _run_chain(self, chain):
        """Run a new flow's atoms one after the other, as TaskFlow's
        machine would (the same actions: state writes, arguments,
        notifications), without the machine's search for the next atoms
        after each one.  True when the flow ended here (succeeded or
        suspended); False at an atom's failure, stored with the atom as
        failed: the machine then resolves it (retry or rollback) from what
        is stored, as when it resumes a flow.  A BaseException of a step
        (``lifecycle.Detach``) goes up as it does through the machine,
        leaving the step running."""
        self.compile()
        self.prepare()
        self.validate()
        storage, runtime = self.storage, self._runtime
        with tf_engine._start_stop(self._task_executor, self._retry_executor):
            self._change_state(tf_states.RUNNING)
            try:
                for atom in chain:
                    if storage.get_flow_state() != tf_states.RUNNING:
                        self._change_state(tf_states.SUSPENDED)  # engine.suspend()
                        return True
                    action = runtime.fetch_action(atom)
                    with storage.lock.write_lock():
                        _outcome, result = action.schedule_execution(atom).result()
                        action.complete_execution(atom, result)
                    if isinstance(result, tf_failure.Failure):
                        return False
                self._change_state(tf_states.SUCCESS)
                return True
            except Exception:
                LOG.exception("engine of flow %s failed running its chain", storage.flow_name)
                self._change_state(tf_states.FAILURE)
                raise

    @tf_misc.cachedproperty
    def storage(self):
        def scope_fetcher(atom_name):
            return self._runtime.fetch_scopes_for(atom_name) if self._compiled else None
        return Storage(self._flow_detail, backend=self._backend,
                        scope_fetcher=scope_fetcher)

    @fasteners.locked
    def compile(self):
        if self._compiled:
            return
        self._compilation = self._given_compilation or self._check_compilation(
            self._compiler.compile())
        self._runtime = Runtime(
            self._compilation, self.storage, self.atom_notifier, self._task_executor,
            self._retry_executor, options=self._options)
        self._runtime.compile()
        self._compiled = True


def _pause(_state, details=None):
    lifecycle.pause()


_factory_names = {}


def _factory_name(factory):
    """The importable name of ``factory`` (checked once, as TaskFlow does)."""
    name = _factory_names.get(factory)
    if name is None:
        name = reflection.get_callable_name(factory)
        if taskflow.engines.helpers._fetch_factory(name) is not factory:
            raise ValueError(f"flow factory {factory!r} is not reimportable by name {name}")
        _factory_names[factory] = name
    return name


def compiled_flow(factory, factory_args):
    """(flow, compilation, reuse key) from ``factory``: built and compiled
    once per thread, and reused by the thread's next runs (running changes
    neither; a flow's tasks are not shared between threads, nor between
    two engines of one thread running at once: then a new one is built)."""
    key = (factory, tuple(factory_args))
    try:
        hash(key)
    except TypeError:
        key = None
    flows = _compiled.__dict__.setdefault("flows", {})
    if key is not None and key not in _compiled.__dict__.setdefault("in_use", set()):
        cached = flows.get(key)
        if cached is not None and cached[2] == _generation[0]:
            return cached[:2] + (key,)
    flow = factory(*factory_args)
    compilation = Engine._check_compilation(tf_compiler.PatternCompiler(flow).compile())
    if key is not None and key not in _compiled.in_use:
        flows[key] = (flow, compilation, _generation[0])
        return flow, compilation, key
    return flow, compilation, None


def load(factory, store, book, backend, factory_args=()):
    """An engine for a new flow from ``factory``, persisted in ``book`` as
    ``load_from_factory`` and the engine's first steps would (logbook, flow
    detail naming the factory, the store as the injector's results, every
    atom pending), in one transaction instead of five."""
    flow, compilation, key = compiled_flow(factory, factory_args)
    flow_detail = tf_models.FlowDetail(flow.name, uuidutils.generate_uuid())
    flow_detail.meta = {"factory": {"name": _factory_name(factory),
                                    "args": list(factory_args), "kwargs": {}}}
    injector = tf_models.TaskDetail(tf_storage.Storage.injector_name,
                                    uuidutils.generate_uuid())
    injector.state = tf_states.SUCCESS
    injector.results = {str(k): value for k, value in store.items()}
    flow_detail.add(injector)
    for atom, attrs in compilation.execution_graph.nodes(data=True):
        if attrs["kind"] in tf_compiler.ATOMS:
            detail = tf_models.RetryDetail if attrs["kind"] == tf_compiler.RETRY \
                else tf_models.TaskDetail
            flow_detail.add(tf_storage.Storage._create_atom_detail(
                atom.name, detail, atom_version=tf_misc.get_version_string(atom)))
    book.add(flow_detail)
    with contextlib.closing(backend.get_connection()) as conn:
        conn.save_logbook(book)
    return Engine(flow, flow_detail, backend, compilation, key,
                   frozenset(injector.results), fresh=True)


@contextlib.contextmanager
def running(engine):
    """While ``engine`` runs, its reused flow is not handed to another
    engine of this thread (a flow's tasks are one run's at a time)."""
    key = getattr(engine, "_reuse_key", None)
    in_use = _compiled.__dict__.setdefault("in_use", set())
    if key is not None:
        in_use.add(key)
    try:
        yield
    finally:
        in_use.discard(key)


def forget_flows():
    """Build every flow anew from now on (tests patch tasks)."""
    _generation[0] += 1
