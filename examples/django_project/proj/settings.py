"""Settings of the example project: Django + Celery + celery-exclusive.

Environment variables (all optional):

    REDIS_URL          the Redis of the broker, results and leases (redis://127.0.0.1:6379/0)
    EXCLUSIVE_STORE    "db" keeps the leases in a database cache table instead of Redis
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-do-not-deploy")
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_exclusive.contrib.django",  # checks, manage.py exclusive, the admin page
    "reports",
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

ROOT_URLCONF = "proj.urls"
WSGI_APPLICATION = "proj.wsgi.application"

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

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# -- Celery ----------------------------------------------------------------------------------

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_ACKS_LATE = True  # a killed worker's task runs again elsewhere
CELERY_WORKER_PREFETCH_MULTIPLIER = 1

# -- celery-exclusive: the one setting -------------------------------------------------------

if os.environ.get("EXCLUSIVE_STORE") == "db":
    # Leases in a database cache table (python manage.py createcachetable makes it). A cache
    # of their own: nothing else writes there, so Django never culls a live lease.
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "leases": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "celery_exclusive_leases",
        },
    }
    CELERY_EXCLUSIVE_CACHE = "leases"
else:
    CELERY_EXCLUSIVE_URL = REDIS_URL

# Defaults for every protected task (each task's own options win):
CELERY_EXCLUSIVE_TTL = 30  # seconds a lease lasts without renewal; renewed every 10 s
