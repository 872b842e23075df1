"""TaskFlow's runtime for the serial engine (``serial_engine``): a walk
for the next atoms that stops at atoms not done yet, per-atom parts made
once per compilation, and the chain a flow's atoms form (run without the
state machine when new)."""
import collections
import functools
import weakref

from taskflow import exceptions as tf_exc
from taskflow import flow as tf_flow
from taskflow import states as tf_states
from taskflow.engines.action_engine import compiler as tf_compiler
from taskflow.engines.action_engine import runtime as tf_runtime
from taskflow.engines.action_engine import scopes as tf_scopes
from taskflow.engines.action_engine import selector as tf_selector
from taskflow.utils import misc as tf_misc


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
