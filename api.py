"""The Python API a cloud controller embeds.

Every operation runs for a caller (``context.RequestContext``: user,
project, roles, request id): the API's own (``MigrationAPI(context=...)``
or ``for_caller``), else the cloud administrator's with a fresh request id.
The caller is authorized first (``policy``: ``Forbidden`` names the rule),
then the request is validated against the state database: a refused
request raises a ``migrateflow.exceptions`` error naming the reason and
leaves every record as it was.  The caller goes into the flow's store, so
a resumed flow still knows who asked; log lines carry its request id.  An
accepted request claims its instance (compare-and-swap on task_state),
records a migration and runs the flow; the returned migration record tells
how it ended.
"""
import contextlib
import logging
import threading
import time

from migrateflow import context as context_mod
from migrateflow import engine
from migrateflow import exceptions as exc
from migrateflow import evacuation_api, inventory_api, lifecycle, notifications, policy
from migrateflow import resize_api, scheduler
from migrateflow.conf import CONF
from migrateflow.db import api as db_api
from migrateflow.flows import live_migration
from migrateflow.keys import StoreKey
from migrateflow.states import FLOW_ENDED, MigrationType, MoveStatus, TaskState
from migrateflow.states import LiveMigrationStatus as Status

LOG = logging.getLogger(__name__)

_ABORTABLE = (Status.QUEUED, Status.PREPARING, Status.RUNNING)


class MigrationAPI(resize_api.ResizeOps, evacuation_api.EvacuationOps,
                   inventory_api.InventoryOps):
    """Operations on instances and migrations of one state database."""

    def __init__(self, conf=CONF, listeners=(), context=None):
        """``listeners``: TaskFlow listener factories attached to every flow
        this API runs (called with the engine).  ``context``: the caller of
        every operation (None: the administrator, a new request id each)."""
        self.conf = conf
        self.listeners = tuple(listeners)
        self.context = None if context is None else context_mod.ensure(context)
        self._threads = {}

    def for_caller(self, context):
        """This API acting for ``context`` (a ``context.RequestContext``)."""
        return type(self)(self.conf, self.listeners, context)

    @property
    def db(self):
        return db_api.get_db(self.conf)

    @contextlib.contextmanager
    def _caller(self, rule, owner=None):
        """The block runs for the caller, authorized for ``rule`` (its log
        lines carry the request id).  ``owner()``: the project owning the
        target, read only when the caller is not allowed by role alone."""
        ctx = context_mod.ensure(self.context)
        with context_mod.bind(request_id=ctx.request_id, context=ctx.to_store()):
            try:
                policy.authorize(ctx, rule, {}, self.conf)
            except exc.Forbidden:
                if owner is None:
                    raise
                policy.authorize(ctx, rule, {"project_id": owner()}, self.conf)
            yield ctx

    def _instance_project(self, instance_id):
        return lambda: self.db.get_instance(instance_id)["project_id"]

    def _migration_project(self, migration_id):
        return lambda: self.db.get_instance(
            self.db.get_migration(migration_id)["instance_uuid"])["project_id"]

    # -- live migration -------------------------------------------------------
    def live_migrate(self, instance_id, host=None, block_migration=None, wait=True):
        """Live-migrate ``instance_id`` to ``host`` (or the best candidate).

        ``block_migration``: True / False, or None to decide from shared
        storage.  With ``[jobboard] enabled`` the flow is posted as a job
        for the conductors; otherwise it runs in this process.  With
        ``wait`` the final migration record is returned; otherwise the
        queued record is returned at once: poll ``show_migration`` or call
        ``wait`` (the interpreter also waits for flows running in-process
        before it exits).
        """
        with self._caller(policy.LIVE_MIGRATE):
            mig, store = self._accept_live_migration(instance_id, host, block_migration)
            return self._launch(live_migration.build, store, mig, wait)

    def _launch(self, factory, store, mig, wait, on_refused=None):
        """Run the accepted ``mig``'s flow: post it to the jobboard, or run it
        in this process (in a thread unless ``wait``).  Returns the record:
        the final one with ``wait``, else the current one.

        ``on_refused(error)``: undo the acceptance when the flow cannot start
        (the jobboard refuses the job, or its flow cannot be persisted;
        default: the migration fails, the instance is released)."""
        store = {**store, StoreKey.CONTEXT: context_mod.current("context")}
        if self.conf.jobboard.enabled:
            self._post(factory, store, mig, on_refused)
            return self.wait(mig["uuid"]) if wait else self.db.get_migration(mig["uuid"])
        if not wait:
            thread = threading.Thread(target=self._run_quietly, name=f"mf-{mig['uuid']}",
                                      args=(factory, store, mig, on_refused))
            self._threads[mig["uuid"]] = thread
            thread.start()
            return self.db.get_migration(mig["uuid"])
        self._run_quietly(factory, store, mig, on_refused)
        return self.db.get_migration(mig["uuid"])

    def _accept_live_migration(self, instance_id, host, block_migration):
        db = self.db
        if host is not None:
            scheduler.validate_host_name(host)
        inst = db.get_instance(instance_id)
        scheduler.check_idle(inst)
        scheduler.check_live_migratable(inst)
        source = db.get_host(inst["host"])
        scheduler.check_host_usable(source, "source")
        candidates, refused = self._candidates(inst, source, host, block_migration)
        mig = db.start_migration(
            instance_id, migration_type=MigrationType.LIVE, task_state=TaskState.MIGRATING,
            source_host=source["name"], requested_dest=host, block_migration=block_migration,
            memory_total_mb=inst["memory_mb"], scheduler_notes=refused)
        store = {
            StoreKey.MIGRATION_ID: mig["uuid"],
            StoreKey.INSTANCE_ID: instance_id,
            StoreKey.SOURCE_HOST: source["name"],
            StoreKey.CANDIDATES: candidates,
            StoreKey.BLOCK_MIGRATION: block_migration,
        }
        LOG.info("live migration accepted migration=%s instance=%s source=%s candidates=%s",
                 mig["uuid"], instance_id, source["name"], ",".join(map(str, candidates)))
        return mig, store

    def _candidates(self, inst, source, host, block_migration):
        """(destinations to try, {refused host: reason}); raises the precise
        reason for a requested host, NoValidHost when none is left."""
        if host is not None:
            dest = self.db.get_host(host)
            scheduler.check_destination(inst, source, dest)
            scheduler.check_storage(inst, source, dest, block_migration)
            return [host], {}
        hosts = [h for h in self.db.list_hosts() if h["name"] != source["name"]]
        usable, refused = [], {}
        for dest in hosts:
            try:
                scheduler.check_destination(inst, source, dest)
                scheduler.check_storage(inst, source, dest, block_migration)
            except exc.MigrateflowError as err:
                refused[dest["name"]] = err.message
            else:
                usable.append(dest)
        names = scheduler.candidate_hosts(inst, source, usable,
                                          self.conf.migrate_max_retries)
        if not names:
            detail = "; ".join(f"{h}: {r}" for h, r in refused.items()) or "no other hosts"
            raise exc.NoValidHost(f"no valid host for instance {inst['uuid']}: {detail}")
        # None closes the list: the flow reports NoValidHost with the reasons
        return names + [None], refused

    def _post(self, factory, store, mig, on_refused=None):
        try:
            engine.post(factory, store, mig["uuid"])
        except Exception as err:
            self._not_started(mig, f"could not post the job: {type(err).__name__}: {err}",
                              on_refused)
            raise exc.FlowNotStarted(
                f"migration {mig['uuid']} not started: the jobboard refused the job "
                f"({type(err).__name__}: {err})") from err

    def _not_started(self, mig, reason, on_refused):
        """Nothing of ``mig``'s flow ran: release the instance, say why."""
        LOG.error("migration=%s not started: %s", mig["uuid"], reason)
        if on_refused is not None:
            on_refused(reason)
        else:
            self.db.finish_migration(
                mig["uuid"], mig["instance_uuid"], MoveStatus.FAILED
                if mig["migration_type"] == MigrationType.EVACUATION else Status.FAILED,
                expected_statuses=[mig["status"]], error=reason)

    def _run_quietly(self, factory, store, mig, on_refused=None):
        try:
            engine.run(factory, store, mig["uuid"], listeners=self.listeners)
        except exc.FlowNotStarted as err:
            self._not_started(mig, err.message, on_refused)
        except Exception as err:  # noqa: BLE001 - the record carries the outcome
            LOG.info("migration=%s ended with %s: %s", mig["uuid"], type(err).__name__, err)

    # -- operator actions on a running migration ------------------------------
    def abort(self, migration_id):
        """Ask a live migration to stop; its rollback leaves the guest on the
        source and the migration ``cancelled``."""
        with self._caller(policy.ABORT):
            return self._abort(migration_id)

    def _abort(self, migration_id):
        mig = self.db.get_migration(migration_id)
        if mig["post_copy"] or mig["status"] not in _ABORTABLE:
            raise exc.InvalidMigrationState(
                f"migration {migration_id} is {mig['status']}"
                f"{' in post-copy' if mig['post_copy'] else ''}: it can no longer be aborted")
        if not self.db.update_migration(migration_id, expected_statuses=_ABORTABLE,
                                        abort_requested=True):
            raise exc.InvalidMigrationState(f"migration {migration_id} just ended")
        mig = self.db.get_migration(migration_id)
        notifications.instance_action("live_migration_abort", "start", mig)
        return mig

    def force_complete(self, migration_id):
        """Ask a running live migration to finish now (post-copy when
        permitted, else pause the guest so the copy converges)."""
        with self._caller(policy.FORCE_COMPLETE):
            return self._force_complete(migration_id)

    def _force_complete(self, migration_id):
        mig = self.db.get_migration(migration_id)
        if mig["status"] != Status.RUNNING:
            raise exc.InvalidMigrationState(
                f"migration {migration_id} is {mig['status']}; only a running "
                "migration can be forced to complete")
        if not self.db.update_migration(migration_id, expected_statuses=[Status.RUNNING],
                                        force_complete_requested=True):
            raise exc.InvalidMigrationState(f"migration {migration_id} just ended")
        mig = self.db.get_migration(migration_id)
        notifications.instance_action("live_migration_force_complete", "start", mig)
        return mig

    def resume(self, migration_id):
        """Continue an interrupted migration's flow from its last step: in
        this process, or (jobboard mode) by posting its job again when the
        board lost it.  Returns the record once the migration ended."""
        with self._caller(policy.RESUME):
            return self._resume(migration_id)

    def _resume(self, migration_id):
        mig = self.db.get_migration(migration_id)
        if mig["status"] in FLOW_ENDED:
            return mig
        if self.conf.jobboard.enabled:
            board_jobs = {job.uuid for job in engine.get_board().iterjobs(ensure_fresh=True)}
            if mig["job_uuid"] not in board_jobs:
                engine.repost(migration_id)
            return self.wait(migration_id)
        try:
            engine.resume(migration_id, listeners=self.listeners)
        except Exception as err:  # noqa: BLE001 - the record carries the outcome
            LOG.info("migration=%s resume ended with %s", migration_id, err)
        return self.db.get_migration(migration_id)

    def wait(self, migration_id, timeout=None, poll=0.05):
        """Wait for a migration to end (run in-process with ``wait=False``, or
        by a conductor); returns the record, transitional only if
        ``timeout`` elapsed."""
        thread = self._threads.get(migration_id)
        if thread is not None:
            thread.join(timeout)
            if not thread.is_alive():
                self._threads.pop(migration_id, None)
            return self.db.get_migration(migration_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            mig = self.db.get_migration(migration_id)
            if mig["status"] in FLOW_ENDED:
                return mig
            if deadline is not None and time.monotonic() >= deadline:
                return mig
            lifecycle.sleep(poll)
