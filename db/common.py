"""Helpers shared by the state-database modules."""
import time

from oslo_db import api as oslo_db_api

#: every public database function retries on deadlocks and lost connections
retry = oslo_db_api.wrap_db_retry(max_retries=5, retry_interval=0.2,
                                  inc_retry_interval=True, retry_on_deadlock=True,
                                  retry_on_disconnect=True)


def now():
    return time.time()


def row(result_row):
    return dict(result_row._mapping) if result_row is not None else None
