"""Kept so `from tests.fixtures_broker import ...` goes on working: the broker helpers live in
tests/plugins/broker.py (registered in tests/conftest.py, which is where the fixtures come from)."""

from tests.plugins.broker import Mosquitto, Subscriber, TlsFiles, client_connections, password_file
from tests.plugins.processes import free_port

__all__ = ["Mosquitto", "Subscriber", "TlsFiles", "client_connections", "free_port", "password_file"]
