"""Settings of the test Django project (tests/test_contrib_django.py).

``CHRONICLE_CONNECTION_STRING`` (environment) is the kernel's connection string;
``CHRONICLE_TEST_CONNECTIONS``, when set, is the whole ``CHRONICLE_CONNECTIONS`` setting
as JSON (to give ``manage.py check`` bad settings). Neither set: no setting at all.
"""

from __future__ import annotations

import json
import os

SECRET_KEY = "chronicle-conn-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "tests.django_project.urls"
WSGI_APPLICATION = "tests.django_project.wsgi.application"
INSTALLED_APPS = ["health_check", "chronicle_conn.contrib.django"]
DATABASES: dict[str, object] = {}
MIDDLEWARE: list[str] = []
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
USE_TZ = True
TIME_ZONE = "UTC"
LOGGING_CONFIG = None  # leave the test process's logging alone

if "CHRONICLE_TEST_CONNECTIONS" in os.environ:
    CHRONICLE_CONNECTIONS = json.loads(os.environ["CHRONICLE_TEST_CONNECTIONS"])
elif "CHRONICLE_CONNECTION_STRING" in os.environ:
    CHRONICLE_CONNECTIONS = {
        "default": {
            "CONNECTION_STRING": os.environ["CHRONICLE_CONNECTION_STRING"],
            "OPTIONS": {"retry_attempts": None},
        }
    }
