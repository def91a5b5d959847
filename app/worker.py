"""gunicorn's threaded worker (gthread) that closes idle kept-alive connections at once on SIGTERM.

The skiff agent stops the old container with SIGTERM after the load balancer's traffic moved to
the new one; the load balancer may still hold idle kept-alive connections to the old one and
reuse them. gthread (gunicorn 23) stops reading those connections at SIGTERM but leaves them open
until the worker exits, which is only after the requests in flight finished (up to
graceful_timeout): a request the load balancer sends on one meanwhile is never read, then the
connection closes under it, and the client gets a 502. This worker closes them as soon as the
signal arrives, so the load balancer sees the close before it picks the connection again.
Requests in flight are untouched: they finish, and their connection is closed after the response
(gthread's own rule once the worker stops).
"""

from __future__ import annotations

import os
import selectors

from gunicorn.workers.gthread import ThreadWorker


class HandoverWorker(ThreadWorker):
    def run(self):
        # gunicorn writes every signal to PIPE (signal.set_wakeup_fd): watching it wakes the main
        # loop at SIGTERM instead of at the end of its 1 s poll.
        self.poller.register(self.PIPE[0], selectors.EVENT_READ, self._drain_wakeups)
        super().run()

    def _drain_wakeups(self, fd):
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass

    def murder_keepalived(self):
        # Called by the main loop once per turn, also on the last turn after SIGTERM.
        super().murder_keepalived()
        if not self.alive:
            self._close_idle()

    def _close_idle(self):
        with self._lock:
            idle = list(self._keep)
            self._keep.clear()
            for conn in idle:
                try:
                    self.poller.unregister(conn.sock)
                except (KeyError, ValueError, OSError):
                    pass  # already gone from the poller
        for conn in idle:
            self.nr_conns -= 1
            conn.close()
        if idle:
            self.log.info("stopping: closed %d idle kept-alive connection(s)", len(idle))
