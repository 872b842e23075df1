"""[notifications] options: which instance changes are announced.

Where notifications go is oslo.messaging's own ``[oslo_messaging_notifications]``
group (``driver``: messagingv2, log, routing, noop; ``transport_url``;
``topics``; ``retry``): with no driver, the default, nothing leaves the process
(the embedded default needs no broker) and only in-process subscribers
(``migrateflow.notifications.subscribe``) hear of anything.
"""
from oslo_config import cfg

OPTS = [
    cfg.StrOpt("notify_on_state_change", default=None,
               choices=[(None, "no instance.update notifications"),
                        ("vm_state", "on vm_state changes"),
                        ("vm_and_task_state", "on vm_state and task_state changes")],
               help="Send instance.update on every change of the instance's "
                    "vm_state, or of its vm_state and task_state (as Nova's "
                    "option of the same name); the payload carries the old "
                    "and new states."),
    cfg.IntOpt("send_retry", default=2, min=0,
               help="Times a notification that could not be sent is retried "
                    "before it is dropped (logged): a migration never waits "
                    "on a message broker that is down."),
]

GROUP = "notifications"


def register_opts(conf):
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]
