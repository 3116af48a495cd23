"""``metrics``: celery-exclusive's Prometheus metrics, served by your Django project.

::

    # urls.py
    urlpatterns = [..., path("celery-exclusive/", include("celery_exclusive.contrib.django.urls"))]

    # settings.py: what Prometheus sends (authorization: {credentials: ...} in its scrape config)
    CELERY_EXCLUSIVE_METRICS_TOKEN = os.environ["METRICS_TOKEN"]

Who may read them: a request with ``Authorization: Bearer <CELERY_EXCLUSIVE_METRICS_TOKEN>``,
or a logged-in user with the ``celery_exclusive.view_heldlease`` permission (the one of the
admin page); anyone else gets 403. The metrics are those counted in this process, or in every
process writing to ``PROMETHEUS_MULTIPROC_DIR`` (set it under gunicorn and uWSGI: see
``docs/metrics.md``).
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

from ... import metrics as core
from ...exceptions import ConfigurationError

__all__ = ["metrics"]

PERMISSION = "celery_exclusive.view_heldlease"


def allowed(request: HttpRequest) -> bool:
    """Whether ``request`` may read the metrics (the bearer token, or the permission)."""
    token = getattr(settings, "CELERY_EXCLUSIVE_METRICS_TOKEN", None)
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), str(token).encode()
        ):
            return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated and user.has_perm(PERMISSION))


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Serve the metrics in Prometheus' text format (OpenMetrics when the scraper asks)."""
    if not allowed(request):
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    try:
        core.import_prometheus()
        registry = core.make_registry()
    except ConfigurationError as exc:
        return HttpResponse(f"{exc}\n", status=501, content_type="text/plain")
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry), content_type=content_type)
