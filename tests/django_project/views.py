"""A view that asks the kernel for its version through ``get_connection()``."""

from __future__ import annotations

import os

import grpc
from django.http import HttpRequest, JsonResponse

import chronicle_conn as cc
from chronicle_conn.contrib.django import get_connection
from tests.helpers import version as kernel_version


def version(request: HttpRequest) -> JsonResponse:
    """200 with the kernel's version; 503 with the state while it cannot be reached.

    ``?wait=<seconds>`` bounds the wait for a connection that is not connected (5 s).
    """
    conn = get_connection()
    try:
        conn.connect(timeout=float(request.GET.get("wait", "5")))
        answer = kernel_version(conn.channel())
    except (cc.NotConnectedError, cc.ConnectTimeoutError, cc.RetriesExhaustedError) as exc:
        return JsonResponse({"error": type(exc).__name__, "state": conn.state.value}, status=503)
    except grpc.RpcError as exc:
        return JsonResponse({"error": exc.code().name, "state": conn.state.value}, status=503)
    return JsonResponse({"version": answer, "pid": os.getpid(), "connection": id(conn)})
