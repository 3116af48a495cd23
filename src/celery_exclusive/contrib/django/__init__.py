"""The Django app of celery-exclusive: add ``"celery_exclusive.contrib.django"`` to
``INSTALLED_APPS`` and one setting::

    CELERY_EXCLUSIVE_URL = "redis://localhost:6379/0"     # any store URL, or:
    CELERY_EXCLUSIVE_CACHE = "default"                    # a Django cache alias, or:
    CELERY_EXCLUSIVE_DATABASE = "default"                 # a lease table in that database

It gives the store to the Celery app (through ``CELERY_EXCLUSIVE_URL``), system checks
(``manage.py check``), ``manage.py exclusive list|show|release`` and an admin page of held
leases with a permission-guarded release. See ``docs/django.md``.
"""
