"""Real peers for the test suite: an HTTP origin, an S3 server, a Glance API.

Each module is a pytest plugin (registered in ``tests/conftest.py``) whose
fixtures start the real thing on a free loopback port and skip loudly when it
cannot run here.
"""
