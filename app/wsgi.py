"""gunicorn's entry point: `gunicorn -c gunicorn.conf.py wsgi:app`.

With `preload_app` this runs once, in gunicorn's master, before any port is bound: a bad
configuration or a database that stays unreachable stops the start with exit code 3 (gunicorn's
"app failed to load"), and the workers fork from an app whose schema is current.
"""

import logging
import sys

from config import Config, ConfigError
from migrations import MigrationError
from store import DatabaseErrors
from web import create_app

# Same shape as gunicorn's own log lines.
logging.basicConfig(
    level=logging.INFO,
    format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    datefmt="%Y-%m-%d %H:%M:%S %z",
)

try:
    config = Config.from_env()
except ConfigError as err:
    print(err, file=sys.stderr)
    raise SystemExit(3) from None

try:
    app = create_app(config)
except (MigrationError, *DatabaseErrors) as err:
    logging.getLogger("app").error(
        "cannot bring the schema of %s up to date: %s", config.database.redacted(), err
    )
    raise SystemExit(3) from None
