"""Applications that the server tests (``tests/test_servers.py``) run under real
pre-forking servers (gunicorn, uWSGI)."""
