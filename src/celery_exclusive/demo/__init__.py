"""Demos a newcomer can run with no server installed (see ``celery-exclusive demo``)."""
