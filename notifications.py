"""Notifications: how the rest of a cloud learns that an instance moved.

Every event goes to the in-process subscribers (``subscribe``) and, when
``[oslo_messaging_notifications] driver`` names one, through oslo.messaging's
``Notifier`` (for example ``messagingv2`` to RabbitMQ, topic
``notifications``: queue ``notifications.info`` / ``notifications.error``).

Events (``event_type``, priority INFO unless said):

* ``instance.update``: the instance's vm_state (or, as
  ``[notifications] notify_on_state_change`` selects, its vm_state or
  task_state) changed; payload ``InstanceUpdatePayload``.
* ``instance.<phase>.start`` / ``.end`` / ``.error`` (ERROR priority): a
  phase of an operation began, ended, failed; payload
  ``InstanceActionPayload``.  Phases (``flow_events.PHASES``):

  - live migration: ``live_migration_check``, ``live_migration_pre``,
    ``live_migration`` (the memory copy), ``live_migration_post``, and on a
    failure ``live_migration_rollback``; an operator's request gives
    ``live_migration_abort.start`` (``.end`` once the rollback ended it) and
    ``live_migration_force_complete.start`` (``.end`` once the copy ended);
  - resize and cold migration: ``resize_prep``, ``resize`` (the source
    side), ``resize_finish`` (the destination side), ``resize_rollback``;
  - confirm: ``resize_confirm`` (``resize_confirm_rollback``); revert:
    ``resize_revert`` (``resize_revert_rollback``);
  - evacuation: ``evacuate`` (checks, fencing, destination), ``rebuild``,
    ``evacuate_rollback``.

Payloads are versioned as Nova's are: ``{"migrateflow_object.name",
"migrateflow_object.namespace": "migrateflow", "migrateflow_object.version",
"migrateflow_object.data"}``.  A minor version adds fields; a major one
changes or removes them.

``InstanceUpdatePayload`` 1.0 data: ``uuid``, ``name``, ``project_id``,
``host``, ``state`` and ``old_state`` (vm_state), ``task_state`` and
``old_task_state``, ``power_state``, ``migration_id`` (when a migration's
flow made the change, else null).

``InstanceActionPayload`` 1.0 data: ``instance_uuid``, ``migration_id``,
``migration_type`` (live-migration, migration, resize, evacuation),
``source_host``, ``dest_host`` (null until chosen), ``status`` (the
migration's), ``phase``, ``step`` (the step that began or ended the phase),
``error`` (``{"type", "message"}`` in ``.error`` events, else null).

Both payloads also carry who asked, as Nova's do: ``request_id``,
``action_initiator_user`` and ``action_initiator_project`` (a flow resumed
by another process keeps its request's); oslo.messaging's drivers do not
send the message context.  The in-process subscribers also get it whole
(``context``: user_id, project_id, roles, request_id).
"""
import datetime
import logging
import socket
import threading
import uuid
import warnings

from migrateflow import context
from migrateflow.conf import CONF

LOG = logging.getLogger(__name__)

NAMESPACE = "migrateflow"
VERSIONS = {"InstanceUpdatePayload": "1.0", "InstanceActionPayload": "1.0"}

_subscribers = {}
_subscribers_lock = threading.Lock()
_notifiers = {}
_notifiers_lock = threading.Lock()


# -- in-process subscribers ------------------------------------------------------------
def subscribe(callback, event_types=None):
    """Call ``callback(message)`` for every event (or those whose type is
    in ``event_types``), in the thread that emits it, in order.  A message
    is a dict: event_type, priority, publisher_id, timestamp, message_id,
    context, payload.  A callback that raises is logged and skipped.
    Returns a handle for ``unsubscribe``."""
    handle = uuid.uuid4().hex
    with _subscribers_lock:
        _subscribers[handle] = (callback, frozenset(event_types) if event_types else None)
    return handle


def unsubscribe(handle):
    with _subscribers_lock:
        _subscribers.pop(handle, None)


def active(conf=CONF):
    """Whether anybody hears events: a subscriber here, or a notifier."""
    return bool(_subscribers) or _notifier(conf) is not None


# -- emission --------------------------------------------------------------------------
def payload(name, data):
    return {"migrateflow_object.name": name, "migrateflow_object.namespace": NAMESPACE,
            "migrateflow_object.version": VERSIONS[name], "migrateflow_object.data": data}


def publisher_id():
    return f"migrateflow:{socket.gethostname()}"


def emit(event_type, name, data, priority="INFO", ctx=None):
    """Send one event to the subscribers and the configured notifier.
    ``ctx``: the request context as a dict (default: the one bound to
    this thread).  Never raises: a notification is not worth a migration."""
    ctx = ctx or context.current("context") or {}
    data = {**data, "request_id": ctx.get("request_id"),
            "action_initiator_user": ctx.get("user_id"),
            "action_initiator_project": ctx.get("project_id")}
    message = {"event_type": event_type, "priority": priority,
               "publisher_id": publisher_id(),
               "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "message_id": str(uuid.uuid4()), "context": ctx,
               "payload": payload(name, data)}
    with _subscribers_lock:
        subscribers = list(_subscribers.values())
    for callback, types in subscribers:
        if types is None or event_type in types:
            try:
                callback(message)
            except Exception:  # noqa: BLE001 - one subscriber must not stop the rest
                LOG.exception("notification subscriber failed event=%s", event_type)
    try:
        notifier = _notifier()
        if notifier is not None:
            getattr(notifier, priority.lower())(ctx, event_type, message["payload"])
    except Exception:  # noqa: BLE001 - logged; the operation goes on
        LOG.exception("notification not sent event=%s", event_type)


def _messaging():
    """oslo.messaging, imported on first use: it pulls in oslo.service (and
    its warning that eventlet is deprecated), which a process that sends no
    notification need not load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import oslo_messaging
        from oslo_messaging import opts
    return oslo_messaging, opts


def register_messaging_opts(conf=CONF):
    """Register ``[oslo_messaging_notifications]`` (to set its options
    before the first event; oslo.messaging registers it then anyway)."""
    _oslo_messaging, opts = _messaging()
    for group, options in opts.list_opts():
        if group == "oslo_messaging_notifications":
            conf.register_opts(options, group=group)


def _notifier(conf=CONF):
    """oslo.messaging's Notifier for ``conf``, None when no driver is set."""
    with _notifiers_lock:
        if id(conf) in _notifiers:
            return _notifiers[id(conf)]
        oslo_messaging, _opts = _messaging()
        register_messaging_opts(conf)
        group = conf.oslo_messaging_notifications
        notifier = None
        if [name for name in group.driver if name != "noop"]:
            transport = oslo_messaging.get_notification_transport(conf)
            notifier = oslo_messaging.Notifier(transport, publisher_id=publisher_id(),
                                               retry=conf.notifications.send_retry)
            LOG.info("notifications enabled drivers=%s topics=%s", ",".join(group.driver),
                     ",".join(group.topics))
        _notifiers[id(conf)] = notifier
        return notifier


def reset():
    """Forget the notifiers (tests change ``[oslo_messaging_notifications]``)."""
    with _notifiers_lock:
        for notifier in _notifiers.values():
            if notifier is not None:
                notifier.transport.cleanup()
        _notifiers.clear()


# -- instance.update ---------------------------------------------------------------------
def state_change_selected(conf=CONF):
    """Which changes ``notify_on_state_change`` selects (None: none)."""
    return conf.notifications.notify_on_state_change


def instance_changed(old, new):
    """``old`` and ``new``: the instance's columns before and after a
    committed change (dicts); sends instance.update when
    ``notify_on_state_change`` selects the change."""
    mode = state_change_selected()
    if mode is None:
        return
    changed = old["vm_state"] != new["vm_state"] or (
        mode == "vm_and_task_state" and old["task_state"] != new["task_state"])
    if not changed:
        return
    emit("instance.update", "InstanceUpdatePayload", {
        "uuid": new["uuid"], "name": new["name"], "project_id": new["project_id"],
        "host": new["host"], "state": new["vm_state"], "old_state": old["vm_state"],
        "task_state": new["task_state"], "old_task_state": old["task_state"],
        "power_state": new["power_state"], "migration_id": context.current("migration_id"),
    })


def instance_action(phase, stage, mig, step=None, error=None, ctx=None):
    """instance.<phase>.<stage> for migration record ``mig``."""
    emit(f"instance.{phase}.{stage}", "InstanceActionPayload", {
        "instance_uuid": mig["instance_uuid"], "migration_id": mig["uuid"],
        "migration_type": mig["migration_type"], "source_host": mig["source_host"],
        "dest_host": mig["dest_host"], "status": mig["status"], "phase": phase,
        "step": step, "error": error,
    }, priority="ERROR" if stage == "error" else "INFO", ctx=ctx)
