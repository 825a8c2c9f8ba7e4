"""Modules generated from ``protos/chronicle_conn/_proto/*.proto``; do not edit by hand.

``clients`` and ``host`` carry the Chronicle kernel's wire contract (see
``shared/CHRONICLE_CONTRACT.md``); ``health`` holds private, wire-compatible copies of the
``grpc.health.v1`` messages (wired up in :mod:`chronicle_conn._health`). Regenerate with
``python setup.py build_protos``; ``tests/test_protos.py`` fails when they are stale.
"""
