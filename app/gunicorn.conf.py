# gunicorn settings, from the environment (see README.md). Binds $HOST:$PORT, 0.0.0.0:8080 by default.
import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT') or '8080'}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads per worker (gthread): a request stuck on a database that does not answer (for up to
# DB_TIMEOUT) holds one thread, not a whole worker, so /health still answers the agent.
threads = int(os.environ.get("WEB_THREADS", "4"))
preload_app = True  # load (and migrate) once, in the master; see wsgi.py
timeout = 30
graceful_timeout = 20  # on SIGTERM, requests in flight get this long to finish
accesslog = "-"
errorlog = "-"
forwarded_allow_ips = "*"  # behind the load balancer; the app reads no client addresses anyway
