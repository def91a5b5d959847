"""The emulator's one lock: the server answers on many threads, and moto's backends and the
tables the extensions keep (hook waits, refreshes, target health, call counts) change under it."""

import threading

LOCK = threading.RLock()
