"""pytest plugins of the test suite, registered in tests/conftest.py (`pytest_plugins`): the fixtures and the
helpers more than one test module uses live here, once; test modules import helpers from here, never from
each other."""
