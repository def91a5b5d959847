# gunicorn settings, from the environment (see README.md). Binds $HOST:$PORT, 0.0.0.0:8080 by default.
# The skiff agent sets PORT: in handover mode each container gets its own slot port, and the host's
# redirect sends the load balancer's port to the healthy one.
import os

from config import DEFAULT_WEB_THREADS

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT') or '8080'}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads per worker: a request stuck on a database that does not answer (for up to DB_TIMEOUT)
# holds one thread, not a whole worker, and the app keeps one thread of each worker free of
# database work (web.py), so /health still answers the agent. Checked by config.py at start.
_threads = os.environ.get("WEB_THREADS", "")
threads = int(_threads) if _threads.isdigit() and int(_threads) > 0 else DEFAULT_WEB_THREADS
# gthread, named rather than implied by threads > 1: with WEB_THREADS=1 gunicorn would fall back
# to the sync worker, which closes the connection after every response (no keep-alive). Ours
# also closes idle kept-alive connections at once on SIGTERM (worker.py).
worker_class = "worker.HandoverWorker"
# Idle kept-alive connections stay open this long: above the ALB's idle timeout (60 s), so that the
# load balancer closes idle connections, never the app. With gunicorn's default 2 s the app closes
# a connection the ALB may be sending a request on at that moment: sporadic 502s.
keepalive = 75
preload_app = True  # load (and migrate) once, in the master; see wsgi.py
timeout = 30
# On SIGTERM: stop accepting, close idle connections, let requests in flight finish for up to this
# long (each connection closed after its response), then exit. Below the agent's stop_timeout
# (30 s by default; the stack's StopTimeoutSeconds), after which Docker sends SIGKILL.
graceful_timeout = 20
accesslog = "-"
errorlog = "-"
forwarded_allow_ips = "*"  # behind the load balancer; the app reads no client addresses anyway
