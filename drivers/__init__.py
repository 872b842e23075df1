"""Hypervisor drivers, loaded by name through stevedore entry points."""
import threading

from stevedore import driver as stevedore_driver

NAMESPACE = "migrateflow.drivers"

_cache = {}
_classes = {}  # driver name -> its class
_lock = threading.Lock()


def get_driver(conf=None):
    """The configured compute driver, built once per (name, settings).

    Tasks call this at run time (never at import or in ``__init__``), so a
    flow rebuilt in another process finds its driver from that process's
    configuration.
    """
    if conf is None:
        from migrateflow.conf import CONF as conf
    name = conf.compute_driver
    mgr_cls = _classes.get(name)
    if mgr_cls is None:  # the entry points are read once per name
        mgr_cls = _classes.setdefault(name, stevedore_driver.DriverManager(
            NAMESPACE, name, invoke_on_load=False).driver)
    key = (name,) + tuple(mgr_cls.cache_key(conf))
    with _lock:
        drv = _cache.get(key)
        if drv is None:
            drv = _cache[key] = mgr_cls.from_conf(conf)
        return drv


def reset_cache():
    """Forget built drivers (tests point the configuration elsewhere)."""
    with _lock:
        _cache.clear()
        _classes.clear()
