"""Test support: a real local S3 server (SeaweedFS) and a TCP fault-injection proxy.

Everything here talks to loopback (127.0.0.1) only.

- :mod:`tests.support.s3server`: :class:`~tests.support.s3server.S3Server`
- :mod:`tests.support.faultproxy`: :class:`~tests.support.faultproxy.FaultProxy`
- :mod:`tests.support.conftest_plugin`: pytest fixtures (``s3_server``, ``s3_bucket``,
  ``fault_proxy``, ``s3_proxy``), registered by ``tests/conftest.py``.
"""
