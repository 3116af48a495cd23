"""Django settings of the test suite (``tests/django/conftest.py`` configures them in-process).

The database is a SQLite file in a temp dir of the session; ``CACHES["db"]`` is a database
cache in it, the store of the admin and command tests (no server needed). Tests that need
Redis or Memcached caches add them with ``override_settings``.
"""

from __future__ import annotations

SECRET_KEY = "celery-exclusive-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.django.urls"
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast, tests only

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_exclusive.contrib.django",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# NAME is set by conftest.py to a file in the session's temp dir.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ""}}

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "db": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "cex_cache"},
}

CELERY_EXCLUSIVE_CACHE = "db"

# The PostgreSQL database cache of the contract tests (its alias is added when it starts).
DATABASE_ROUTERS = ["tests.django.routers.PostgresCacheRouter"]
