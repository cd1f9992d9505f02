"""Block until the database at $CAVIAR_DATABASE_URL is reachable and `caviar db upgrade` has
brought it current: the init container of every Caviar pod, so that the API, the workers and the
dashboard start after the caviar-migrate Job and never run DDL themselves.

Usage: python wait_for_migrations.py [SECONDS_BETWEEN_CHECKS]
"""

import os
import sys
import time

from caviar.db.migrate import is_current


def main() -> None:
    interval = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    url = os.environ["CAVIAR_DATABASE_URL"]
    while True:
        try:
            if is_current(url):
                print("database is current", flush=True)
                return
            print("waiting for `caviar db upgrade` (the caviar-migrate Job)", flush=True)
        except Exception as error:  # unreachable yet: keep waiting, say why
            print(f"waiting for the database: {error}", flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
