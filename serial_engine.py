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
bounds the version, tests/test_perf_engine.py and the crash matrices check
it.
"""
import collections
import contextlib
import functools
import logging
import threading
import weakref

import fasteners
import taskflow.engines
from oslo_utils import reflection, uuidutils
from taskflow import exceptions as tf_exc
from taskflow import flow as tf_flow
from taskflow import states as tf_states
from taskflow import storage as tf_storage
from taskflow.engines.action_engine import compiler as tf_compiler
from taskflow.engines.action_engine import engine as tf_engine
from taskflow.engines.action_engine import runtime as tf_runtime
from taskflow.engines.action_engine import scopes as tf_scopes
from taskflow.engines.action_engine import selector as tf_selector
from taskflow.persistence import models as tf_models
from taskflow.types import failure as tf_failure
from taskflow.types import notifier as tf_notifier
from taskflow.utils import misc as tf_misc

from migrateflow import lifecycle, persistence

LOG = logging.getLogger(__name__)

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


_compiled = threading.local()  # this thread's flows and their compilation
_generation = [0]  # flows built before the last reset() are built again
_validated = weakref.WeakKeyDictionary()  # compilation -> store key sets it passed with


_DONE_STATES = frozenset((tf_states.SUCCESS, tf_states.IGNORE))
_DONE_INTENTIONS = frozenset((tf_states.EXECUTE, tf_states.IGNORE))


class Selector(tf_selector.Selector):
    """TaskFlow's selector, whose walk forward from a finished atom does not
    go past an atom that is not done (succeeded or ignored): an atom is
    ready only when every atom before it is done, so what lies beyond one
    that is not cannot be ready.  It finds the atoms TaskFlow's full walk
    finds, in the same order, visiting those of the next steps only (the
    full walk checks every later atom of the flow after each one)."""

    def _browse_atoms_for_execute(self, atom=None):
        if atom is None:
            yield from super()._browse_atoms_for_execute()
            return
        graph, storage = self._execution_graph, self._storage
        queue, seen = collections.deque(graph.successors(atom)), set()
        while queue:
            node = queue.popleft()
            if node in seen:
                continue
            seen.add(node)
            if graph.nodes[node].get("noop"):  # a flow's start or end
                queue.extend(graph.successors(node))
                continue
            is_ready, late_decider = self._get_maybe_ready_for_execute(node)
            if is_ready:
                yield node, late_decider
                continue
            state, intention = storage.get_atoms_states([node.name])[node.name]
            if state in _DONE_STATES and intention in _DONE_INTENTIONS:
                queue.extend(graph.successors(node))


#: compilation -> {atom name: (kind, scope walker, edge deciders)}: what a
#: runtime keeps per atom that depends on the compilation alone
_atom_parts = weakref.WeakKeyDictionary()


class Runtime(tf_runtime.Runtime):
    """TaskFlow's runtime with :class:`Selector`, whose per-atom parts that
    depend on the compilation alone are made once per compilation and
    shared by the runtimes of every engine reusing it (``compiled_flow``):
    a scope walker remembers the scopes it walked (each argument lookup
    walks them), and finding an atom's place in the hierarchy and its
    edge deciders is done once, not per run."""

    @tf_misc.cachedproperty
    def selector(self):
        return Selector(self)

    def compile(self):
        parts = _atom_parts.get(self._compilation)
        if parts is None:
            parts = _atom_parts[self._compilation] = self._atom_parts()
        handlers = {
            tf_compiler.TASK: (functools.partial(self.task_action.change_state, progress=0.0),
                               self.task_scheduler, tf_states.check_task_transition,
                               self.task_action),
            tf_compiler.RETRY: (self.retry_action.change_state, self.retry_scheduler,
                                tf_states.check_retry_transition, self.retry_action),
        }
        for name, (kind, walker, deciders) in parts.items():
            change_state, scheduler, check_transition, action = handlers[kind]
            self._atom_cache[name] = {
                "scope_walker": walker, "edge_deciders": deciders, "action": action,
                "change_state_handler": change_state, "scheduler": scheduler,
                "check_transition_handler": check_transition}

    def _atom_parts(self):
        graph, parts = self._compilation.execution_graph, {}
        for node, attrs in graph.nodes(data=True):
            kind = attrs["kind"]
            if kind in tf_compiler.FLOWS:
                continue
            if kind not in tf_compiler.ATOMS:
                raise tf_exc.CompilationFailure(f"Unknown node kind '{kind}' encountered")
            parts[node.name] = (kind, tf_scopes.ScopeWalker(self._compilation, node,
                                                            names_only=True),
                                tuple(self._walk_edge_deciders(graph, node)))
        return parts


_chains = weakref.WeakKeyDictionary()  # compilation -> its atoms in order, or None


def chain_of(compilation):
    """The atoms of ``compilation`` in the order they run when they form
    one chain (each node of the execution graph has at most one
    predecessor and one successor, and no link has a decider), else None."""
    try:
        return _chains[compilation]
    except KeyError:
        pass
    graph, chain = compilation.execution_graph, None
    if all(degree <= 1 for _, degree in graph.in_degree()) and \
            all(degree <= 1 for _, degree in graph.out_degree()) and \
            not any(tf_flow.LINK_DECIDER in attrs for _, _, attrs in graph.edges(data=True)):
        chain = tuple(node for node in graph.topological_sort()
                      if graph.nodes[node]["kind"] in tf_compiler.ATOMS)
    _chains[compilation] = chain
    return chain


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
