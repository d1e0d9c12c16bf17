"""A real PostgreSQL server for tests: a temporary cluster on a Unix socket.

The Debian server binaries live in /usr/lib/postgresql/<version>/bin. The
server refuses to run as root, so as root it runs as the ``postgres`` user
(``runuser``); its data directory and socket live in a fresh temporary folder
that the server's user owns, and are removed when the server stops.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time


def server_bin() -> str | None:
    """The newest installed PostgreSQL server's bin folder, if any."""
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/pg_ctl'))
    return os.path.dirname(found[-1]) if found else None


def required_server_bin() -> str:
    """:func:`server_bin`, or the test fails under CI (whose setup installs the server)
    and is skipped elsewhere."""
    import pytest  # pylint: disable=g-import-not-at-top

    bin_dir = server_bin()
    if bin_dir is None:
        if os.environ.get('CI'):
            pytest.fail('the PostgreSQL server is not installed (.ci/run installs it)')
        pytest.skip('no PostgreSQL server installed')
    return bin_dir


class PostgresServer:
    """``with PostgresServer() as url:`` a SQLAlchemy URL of a fresh, empty database."""

    def __init__(self, bin_dir: str):
        self.bin_dir = bin_dir
        self.root = tempfile.mkdtemp(prefix='resnet_jax_pg_')
        self.data = os.path.join(self.root, 'data')
        self.socket_dir = self.root
        self.as_root = os.geteuid() == 0
        self.user = 'postgres' if self.as_root else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [os.path.join(self.bin_dir, args[0]), *args[1:]]
        if self.as_root:
            command = ['runuser', '-u', 'postgres', '--', *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)

    def __enter__(self) -> str:
        if self.as_root:
            shutil.chown(self.root, 'postgres', 'postgres')
            os.chmod(self.root, 0o700)
        self._run('initdb', '-D', self.data, '-A', 'trust', '-U', self.user, '--no-sync')
        self.start()
        return self.url

    @property
    def url(self) -> str:
        return f'postgresql+psycopg2://{self.user}@/postgres?host={self.socket_dir}'

    def start(self) -> None:
        """Starts the server (again) and waits until it accepts connections."""
        options = f"-c listen_addresses='' -k {self.socket_dir} -c fsync=off"
        log = os.path.join(self.root, 'server.log')  # The server must not hold our pipes.
        self._run('pg_ctl', '-D', self.data, '-l', log, '-o', options, '-w', '-t', '60', 'start')
        self._wait(self.url)

    def stop(self) -> None:
        """Stops the server at once (``pg_ctl stop -m immediate``), as a crash would."""
        self._run('pg_ctl', '-D', self.data, '-m', 'immediate', '-w', 'stop')

    def _wait(self, url: str) -> None:
        import sqlalchemy  # pylint: disable=g-import-not-at-top

        engine = sqlalchemy.create_engine(url)
        for _ in range(100):
            try:
                with engine.connect():
                    return
            except sqlalchemy.exc.OperationalError:
                time.sleep(0.1)
        raise RuntimeError('the PostgreSQL test server did not accept connections')

    def __exit__(self, *exc) -> None:
        try:
            self._run('pg_ctl', '-D', self.data, '-m', 'immediate', '-w', 'stop')
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
