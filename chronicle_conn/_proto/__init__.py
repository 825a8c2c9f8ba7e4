"""Modules generated from ``protos/chronicle_conn/_proto/*.proto``; do not edit by hand.

``clients`` and ``host`` carry the Chronicle kernel's wire contract (the names and
field numbers the kernel serves, checked by ``tests/test_protos.py``); ``health`` holds
private, wire-compatible copies of the ``grpc.health.v1`` messages (wired up in
:mod:`chronicle_conn._health`). Regenerate with ``python setup.py build_protos``;
``tests/test_protos.py`` fails when they are stale.
"""
